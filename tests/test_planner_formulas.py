"""The planner's arithmetic against hand-computed figures, and its parsers against anything."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.planner.arch import BUILTIN, ArchError, arch_from_config, resolve_arch
from uff_port.planner.estimate import (
    CUDA_CONTEXT,
    Candidate,
    Workload,
    activation_bytes,
    estimate,
    nf4_bytes_per_param,
)
from uff_port.planner.search import candidates, overrides_for, plan, rank
from uff_port.planner.sizes import GiB, SizeError, parse_gpus, parse_size

A13 = BUILTIN["deepseek-coder-1.3b"]
A67 = BUILTIN["deepseek-coder-6.7b"]


def test_parameter_counts_match_the_published_models() -> None:
    # 2*V*h + L*(4h^2 + 3hI + 2h) + h, by hand.
    assert A13.n_params == 2 * 32256 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 * 5504 + 2 * 2048) + 2048
    assert A13.n_params == 1_346_471_936  # "1.35B parameters" in the HF loader log
    assert A67.n_params == 6_740_512_768


def test_lora_parameter_count_by_hand() -> None:
    # r*(in+out) per target: 4 attention (2048+2048), gate/up/down (2048+5504).
    per_layer = 16 * (4 * 4096 + 3 * 7552)
    assert A13.lora_params(16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) == 24 * per_layer
    assert A13.lora_params(8, ("q_proj", "v_proj")) == 24 * 8 * 2 * 4096


def test_nf4_constants_follow_the_qlora_paper() -> None:
    # Double quantization: 8/64 + 32/(64*256) = 0.127 bits of constants per parameter.
    assert nf4_bytes_per_param(True) * 8 == pytest.approx(4.127, abs=1e-3)
    assert nf4_bytes_per_param(False) * 8 == pytest.approx(4.5)


def test_weights_and_states_by_hand() -> None:
    wl = Workload(seq_len=2048)
    e = estimate(A13, Candidate("full", "single", 1, True, 1), wl)
    assert e.gpu["weights"] == A13.n_params * 2
    assert e.gpu["gradients"] == A13.n_params * 2
    assert e.gpu["optimizer"] == A13.n_params * 4  # AdamW m, v in bf16 (params' dtype)
    n_lora = A13.lora_params(16, wl.lora_targets)
    e = estimate(A13, Candidate("lora", "single", 1, True, 1), wl)
    assert (e.gpu["trainable_params"], e.gpu["gradients"], e.gpu["optimizer"]) == (4 * n_lora, 4 * n_lora, 8 * n_lora)
    assert e.gpu["cuda_context"] == CUDA_CONTEXT


def test_zero_partitioning_by_hand() -> None:
    wl = Workload(seq_len=512)
    n = A13.n_params
    z2 = estimate(A13, Candidate("full", "zero2", 2, True, 1), wl)
    assert z2.gpu["optimizer"] == 12 * n // 2  # ZeRO paper: K=12 bytes of fp32 state, split
    assert z2.gpu["weights"] == 2 * n  # stage 2 keeps parameters whole
    z3 = estimate(A13, Candidate("full", "zero3", 2, True, 1), wl)
    assert z3.gpu["weights"] < z2.gpu["weights"] * 0.6
    off = estimate(A13, Candidate("full", "zero3_offload", 2, True, 1), wl)
    assert off.gpu["optimizer"] == 0 and off.cpu["offload"] >= 2 * n + 16 * n
    ddp = estimate(A13, Candidate("full", "ddp", 2, True, 1), wl)
    assert ddp.gpu["overhead"] > ddp.gpu["gradients"]  # DDP buckets copy the gradients


def test_logits_and_checkpointing_by_hand() -> None:
    wl = Workload(seq_len=2048, loss="full", packing=False)
    a = activation_bytes(A67, Candidate("lora", "single", 1, True, 2), wl)
    tokens = 2 * 2048
    assert a["logits"] == tokens * 32256 * (2 + 4 + 8)  # bf16 logits, fp32 log-softmax, fp32 grads
    assert a["saved"] == 32 * tokens * 2 * 4096 + tokens * (4 * 4096 + 4)
    no_ck = activation_bytes(A67, Candidate("lora", "single", 1, False, 2), wl)
    assert no_ck["saved"] > 10 * a["saved"]
    # linear in tokens, plus each layer's bf16 copies of its fp32 adapter weights (autocast)
    copies = 2 * A67.lora_params(16, wl.lora_targets)
    mb4 = activation_bytes(A67, Candidate("lora", "single", 1, False, 4), wl)["saved"]
    assert mb4 == pytest.approx(2 * no_ck["saved"] - copies)


def test_eager_attention_adds_the_quadratic_term() -> None:
    c = Candidate("lora", "single", 1, False, 1)
    sdpa = activation_bytes(A13, c, Workload(seq_len=1024, packing=False))["saved"]
    eager = activation_bytes(A13, c, Workload(seq_len=1024, attn="eager", packing=False))["saved"]
    assert eager - sdpa == pytest.approx(24 * 1024 * (16 * 1024 * 6 - 4 * 16))


def test_recommendations_for_the_two_deepseek_sizes() -> None:
    wl = Workload(seq_len=2048)
    _, best67 = plan(A67, wl, [16 * GiB], 64 * GiB)
    assert best67 is not None and best67.est.candidate.method == "qlora"
    assert best67.est.gpu_total <= 0.9 * 16 * GiB
    _, best13 = plan(A13, wl, [16 * GiB] * 2, 64 * GiB)
    assert best13 is not None and best13.est.candidate.strategy == "ddp"
    _, none = plan(A67, wl, [1 * GiB], 64 * GiB)
    assert none is None


def test_ranking_prefers_no_checkpointing_then_bigger_batches() -> None:
    wl = Workload(seq_len=256)
    cands = [Candidate("lora", "single", 1, ck, mb) for ck in (False, True) for mb in (1, 4)]
    from uff_port.planner.search import judge

    ranked = rank([judge(estimate(A13, c, wl), None, None, 0.1) for c in cands])
    order = [(s.est.candidate.grad_ckpt, s.est.candidate.micro_batch) for s in ranked]
    assert order == [(False, 4), (False, 1), (True, 4), (True, 1)]


def test_candidate_space() -> None:
    one = candidates(1, ("full", "lora", "qlora"), 8)
    assert {c.strategy for c in one} == {"single", "zero3_offload"}
    two = candidates(2, ("qlora",), 4)
    assert {c.strategy for c in two} == {"single", "ddp"}  # no ZeRO for 4-bit
    assert {c.micro_batch for c in two} == {1, 2, 4}
    assert all(c.strategy == "single" and c.method != "qlora" for c in candidates(0, ("full", "lora", "qlora"), 2))


def test_overrides_name_real_config_keys() -> None:
    from uff_port.core.config import validate_config

    for c in candidates(2, ("full", "lora", "qlora"), 2):
        validate_config({}, overrides_for(c, 16))


def test_estimates_are_fast() -> None:
    wl = Workload(seq_len=2048)
    t = time.perf_counter()
    plan(A67, wl, [16 * GiB] * 2, 64 * GiB, mb_max=16)
    assert time.perf_counter() - t < 0.5


# ---- parsers -------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("16GiB", 16 * GiB), ("16G", 16 * GiB), ("16GB", 16 * 10**9), ("16 gib", 16 * GiB),
    ("1.5TiB", int(1.5 * 1024**4)), ("512MiB", 512 * 2**20), ("1024", 1024), (4096, 4096),
])
def test_parse_size_examples(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "16GiBs", "-1GiB", "0GiB", "16 XB", "1e9", "0", True, None, 1.5])
def test_parse_size_refuses_with_field_name(text: object) -> None:
    with pytest.raises(SizeError, match="cpu_ram"):
        parse_size(text, "cpu_ram")  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["GiB", "G", "MiB", "GB", "KiB", "TB"]))
def test_parse_size_scales_exactly(n: int, unit: str) -> None:
    base = {"GiB": GiB, "G": GiB, "MiB": 2**20, "GB": 10**9, "KiB": 1024, "TB": 10**12}[unit]
    assert parse_size(f"{n}{unit}") == n * base


@given(st.text(max_size=24))
@settings(max_examples=300)
def test_parse_size_and_gpus_never_crash(text: str) -> None:
    for fn in (parse_size, parse_gpus):
        try:
            out = fn(text)
        except SizeError:
            continue
        assert (out > 0) if isinstance(out, int) else all(x > 0 for x in out)


@given(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=200))
def test_parse_gpus(count: int, gib: int) -> None:
    assert parse_gpus(f"{count}x{gib}GiB") == [gib * GiB] * count
    assert parse_gpus(f"{gib}GiB") == [gib * GiB]


def test_parse_gpus_errors() -> None:
    assert parse_gpus("none") == []
    for bad in ("0x16GiB", "65x16GiB", "2x", "twox16GiB"):
        with pytest.raises(SizeError, match="gpus"):
            parse_gpus(bad)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@given(st.dictionaries(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "vocab_size", "num_key_value_heads",
                                        "head_dim", "tie_word_embeddings", "text_config"]),
                       _json_values | st.integers(1, 4096), max_size=9))
@settings(max_examples=300)
def test_arch_from_any_config_map(cfg: dict) -> None:
    try:
        arch = arch_from_config(cfg, "x")
    except ArchError as exc:
        assert "model:" in str(exc)
        return
    assert arch.n_params > 0 and arch.kv_dim > 0


def test_resolve_arch_local_dir_and_hf_cache(tmp_path, monkeypatch) -> None:
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 176, "vocab_size": 512, "max_position_embeddings": 256}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert resolve_arch(str(tmp_path / "m")).kv_dim == 32
    hub = tmp_path / "hub"
    snap = hub / "models--acme--coder" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    (hub / "models--acme--coder" / "refs").mkdir()
    (hub / "models--acme--coder" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_arch("acme/coder").hidden == 64
    assert resolve_arch("acme/coder", "a" * 40).layers == 2
    with pytest.raises(ArchError, match="not in the local HF cache"):
        resolve_arch("acme/other")
    with pytest.raises(ArchError, match="without config.json"):
        resolve_arch(str(tmp_path))
    assert resolve_arch("deepseek-ai/deepseek-coder-6.7b-instruct") is A67


def test_planned_accumulation_keeps_the_global_batch_whatever_the_process_count() -> None:
    from uff_port.planner.estimate import Candidate
    from uff_port.planner.search import grad_accum

    for nproc in (1, 2, 4):
        cand = Candidate("qlora", "ddp" if nproc > 1 else "single", nproc, True, 4)
        accum = grad_accum(cand, 64)
        # The trainer's global batch: micro_batch_size * grad_accum_steps, accumulation divisible by nproc.
        assert accum % nproc == 0 and 4 * accum >= 64 and 4 * (accum - nproc) < 64, (nproc, accum)
        over = overrides_for(cand, 64)
        assert over["training.grad_accum_steps"] == accum
