"""Chunked cross-entropy equals today's full loss; packing never computes its padding.

Tolerances (measured here, the documented ones in docs/memory.md): fp32, the loss
sum within rel 1e-5 and the LoRA gradients within rel 1e-4 of their largest
element; bf16 autocast, within 1e-2 (both sides round the logits to bf16; the
chunked side sums in a different order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.core.config import Config
from uff_port.training.builtin import ensure_tiny_llama
from uff_port.training.data import IGNORE, PackedStream, Sequence_, collate
from uff_port.training.loss import (
    chunk_rows,
    chunked_ce_sum,
    full_loss_sum,
    loss_sum,
)
from uff_port.training.model import Precision, load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(os.environ.get("UFF_PORT_CACHE") or tmp_path_factory.getbasetemp() / "uff-cache")
    os.environ["UFF_PORT_CACHE"] = str(cache)
    return ensure_tiny_llama(cache)


def _cfg(**model: Any) -> Config:
    return Config.model_validate({
        "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True, **model},
        "data": {"seq_len": 128, "eval_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"device": "cpu", "precision": "fp32"},
    })  # fmt: skip


def _model(cfg: Config) -> Any:
    torch.manual_seed(7)
    m = load_model(cfg, torch.device("cpu"), Precision(None, False, "fp32"))
    # Non-zero lora_B, so the adapters' gradients depend on everything upstream.
    for name, p in m.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return m.train()


def _batch(cfg: Config, n: int = 3) -> dict[str, torch.Tensor]:
    stream = PackedStream(cfg.data.path, load_tokenizer(cfg), cfg.data)
    return collate(stream.take(n), stream.pad_id)


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor], mode: str,
                    autocast: torch.dtype | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    s = loss_sum(model, dict(batch), autocast, mode)  # type: ignore[arg-type]
    s.backward()
    return float(s), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        scale = float(b[k].abs().max())
        assert float((a[k] - b[k]).abs().max()) <= rel * scale + 1e-12, k


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 700), vocab=st.integers(2, 600), bias=st.booleans(), ignored=st.floats(0.0, 0.9),
       seed=st.integers(0, 2**16))
def test_fused_linear_ce_matches_cross_entropy(n: int, vocab: int, bias: bool, ignored: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 16, generator=g).requires_grad_()
    head = torch.nn.Linear(16, vocab, bias=bias)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = IGNORE
    ref = F.cross_entropy(head(h), y, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    want = [h.grad.clone()] + [p.grad.clone() for p in head.parameters()]  # type: ignore[union-attr]
    h.grad = None
    head.zero_grad(set_to_none=True)
    got = chunked_ce_sum(head, h, y, None)
    (got * 0.5).backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-4)
    for w, p in zip(want, [h.grad] + [p.grad for p in head.parameters()], strict=True):
        assert p is not None
        torch.testing.assert_close(p, 0.5 * w, rtol=1e-4, atol=1e-5)


def test_chunks_are_a_quarter_of_the_tokens_within_bounds() -> None:
    assert chunk_rows(2047, 32256) == 512 and chunk_rows(8191, 32256) == 1024 and chunk_rows(10, 32256) == 128
    assert chunk_rows(8191, 128256) == 256  # a larger vocabulary: smaller chunks, same logits bytes


def test_no_target_keeps_the_graph_and_gives_zero() -> None:
    h = torch.randn(5, 4, requires_grad=True)
    s = chunked_ce_sum(torch.nn.Linear(4, 9), h, torch.full((5,), IGNORE), None)
    s.backward()
    assert float(s) == 0.0 and h.grad is not None and float(h.grad.abs().sum()) == 0.0


def test_chunked_equals_full_on_the_tiny_model(tiny: Path) -> None:
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch(cfg)
    assert (batch["labels"] == IGNORE).any()  # masked prompts and sample starts are skipped
    full, g_full = _loss_and_grads(model, batch, "full")
    chunked, g_chunked = _loss_and_grads(model, batch, "chunked")
    assert chunked == pytest.approx(full, rel=1e-5)
    _close(g_chunked, g_full, 1e-4)
    assert all("lora_" in k for k in g_full)


def test_chunked_equals_full_under_bf16_autocast(tiny: Path) -> None:
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch(cfg, 2)
    full, g_full = _loss_and_grads(model, batch, "full", torch.bfloat16)
    chunked, g_chunked = _loss_and_grads(model, batch, "chunked", torch.bfloat16)
    assert chunked == pytest.approx(full, rel=1e-2)
    _close(g_chunked, g_full, 3e-2)


def test_an_adapted_head_goes_through_checkpointed_chunks(tiny: Path) -> None:
    """LoRA on lm_head: not a plain Linear, so each chunk runs the module under checkpoint."""
    cfg = _cfg()
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": ["q_proj", "lm_head"]})})
    model = _model(cfg)
    batch = _batch(cfg, 2)
    full, g_full = _loss_and_grads(model, batch, "full")
    chunked, g_chunked = _loss_and_grads(model, batch, "chunked")
    assert any("lm_head" in k for k in g_full)
    assert chunked == pytest.approx(full, rel=1e-5)
    _close(g_chunked, g_full, 1e-4)


def test_eval_without_grad_gives_the_same_value(tiny: Path) -> None:
    cfg = _cfg()
    model = _model(cfg).eval()
    batch = _batch(cfg, 2)
    with torch.no_grad():
        a = float(full_loss_sum(model, dict(batch), None))
        b = float(loss_sum(model, dict(batch), None, "chunked"))
    assert b == pytest.approx(a, rel=1e-5)


def test_every_other_layer_checkpointing_changes_nothing_but_memory(tiny: Path) -> None:
    batch = _batch(_cfg(), 2)
    ref, g_ref = _loss_and_grads(_model(_cfg()), batch, "chunked")
    m = _model(_cfg(gradient_checkpointing="every_other"))
    flags = [layer.gradient_checkpointing for layer in m.get_base_model().model.layers]
    assert flags == [i % 2 == 0 for i in range(len(flags))]
    got, g = _loss_and_grads(m, batch, "chunked")
    assert got == pytest.approx(ref, rel=1e-6)
    _close(g, g_ref, 1e-5)


# ---- packing ---------------------------------------------------------------------


def _row(samples: list[list[int]], width: int, pad_id: int = 0) -> Sequence_:
    ids = [t for s in samples for t in s]
    labels = [x for s in samples for x in [IGNORE] + s[1:]]
    pos = [p for s in samples for p in range(len(s))]
    pad = width - len(ids)
    return Sequence_(ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(pad)), pad)


def test_collate_cuts_the_padding_every_row_shares() -> None:
    rows = [_row([[5, 6, 7], [8, 9]], 12), _row([[1, 2, 3, 4]], 12)]
    batch = collate(rows, 0)
    assert batch["input_ids"].shape == (2, 5) and "attention_mask" not in batch
    flat = collate(rows, 0, flatten=True)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert sum(s.n_targets for s in rows) == int((flat["labels"][:, 1:] != IGNORE).sum())


def test_packed_rows_lose_to_no_sample_what_they_gain_in_speed(tiny: Path) -> None:
    """A packed row (and the flattened form flash attention gets) gives the loss of its samples run alone."""
    cfg = _cfg()
    model = _model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (17, 40, 9, 30)]
    rows = [_row(samples[:2], 64), _row(samples[2:], 64)]
    with torch.no_grad():
        alone = sum(float(full_loss_sum(model, collate([_row([s], len(s))], 0), None)) for s in samples)
        padded = float(full_loss_sum(model, {k: v for k, v in collate(rows, 0).items()}, None))
        flat = float(loss_sum(model, collate(rows, 0, flatten=True), None, "chunked"))
        # Without position_ids the same row is one long sample: a different loss.
        joined = collate(rows, 0)
        joined.pop("position_ids")
        crossed = float(full_loss_sum(model, joined, None))
    assert padded == pytest.approx(alone, rel=1e-5)
    assert flat == pytest.approx(alone, rel=1e-5)
    assert abs(crossed - alone) > 1e-3 * alone
