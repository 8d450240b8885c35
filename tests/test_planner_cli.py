"""`uff-port plan` end to end in a subprocess, the worker command, and the train guard."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.core.config import validate_config
from uff_port.planner.commands import plan as plan_command
from uff_port.planner.guard import check_config
from uff_port.protocol.errors import CommandError

GIB = 2**30
GPU16 = {"index": 0, "name": "RTX 5060 Ti", "memory_total": 16 * GIB}


def _plan(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uff_port.cli", "plan", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_prints_a_table_and_recommends() -> None:
    p = _plan("--model", "deepseek-coder-6.7b", "--gpus", "1x16GiB", "--cpu-ram", "64GiB", "--seq-len", "2048")
    assert p.returncode == 0, p.stderr
    assert "deepseek-coder-6.7b" in p.stdout and "recommended: qlora/singlex1" in p.stdout


def test_cli_json_and_write_config(tmp_path: Path) -> None:
    out = tmp_path / "rec.yaml"
    p = _plan("--model", "deepseek-coder-1.3b", "--gpus", "2x16GiB", "--cpu-ram", "128GiB",
              "--seq-len", "1024", "--json", "--write-config", str(out))
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    rec = result["recommended"]
    assert rec["fits"] and rec["gpu_total"] <= 0.9 * 16 * GIB
    assert {"weights", "trainable_params", "gradients", "optimizer", "activations", "logits",
            "overhead", "cuda_context"} <= set(rec["gpu"])
    cfg = validate_config(yaml.safe_load(out.read_text()))
    assert cfg.training.micro_batch_size == rec["micro_batch"]
    assert cfg.distributed.nproc == rec["nproc"]
    assert cfg.model.gradient_checkpointing == rec["gradient_checkpointing"]
    assert cfg.data.seq_len == 1024
    assert cfg.model.name_or_path == "deepseek-ai/deepseek-coder-1.3b-base"


def test_cli_write_config_for_deepspeed(tmp_path: Path) -> None:
    out = tmp_path / "ds.yaml"
    p = _plan("--model", "deepseek-coder-6.7b", "--gpus", "1x12GiB", "--seq-len", "2048", "--methods",
              "lora", "--write-config", str(out))
    assert p.returncode == 0, p.stderr
    cfg = validate_config(yaml.safe_load(out.read_text()))
    assert cfg.distributed.backend == "deepspeed" and cfg.quantization.mode == "none"
    ds_path = Path(cfg.distributed.deepspeed_config)
    if not ds_path.is_absolute():
        ds_path = Path(__file__).resolve().parents[1] / ds_path
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(("args", "needle"), [
    (["--gpus", "2xbanana"], "gpus: cannot read"),
    (["--cpu-ram", "lots"], "cpu_ram: cannot read"),
    (["--seq-len", "0"], "seq_len: must be"),
    (["--methods", "lora,magic"], "methods: unknown"),
    (["--model", "no/such-model"], "not in the local HF cache"),
])
def test_cli_bad_arguments_exit_2_and_name_the_field(args: list[str], needle: str) -> None:
    p = _plan(*args)
    assert p.returncode == 2 and needle in p.stderr, p.stderr


def test_cli_nothing_fits_exits_1() -> None:
    p = _plan("--model", "deepseek-coder-6.7b", "--gpus", "1x1GiB")
    assert p.returncode == 1 and "nothing fits" in p.stdout


def test_probe_without_gpu_says_so() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the probe would run")
    p = _plan("--model", "deepseek-coder-1.3b", "--probe")
    assert p.returncode == 3 and "needs a CUDA GPU" in p.stderr


def test_plan_does_not_import_torch() -> None:
    code = ("import sys; from uff_port.planner.commands import PlanArgs, compute; "
            "compute(PlanArgs({'model': 'deepseek-coder-6.7b'})); "
            "from uff_port.planner.guard import check_config; print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stderr


# ---- worker command -------------------------------------------------------------

def test_worker_command_plan(tmp_path: Path) -> None:
    ctx = SimpleNamespace(runs_root=tmp_path, emit=lambda *a, **k: None)
    res = plan_command({"model": "deepseek-coder-1.3b", "gpus": "1x16GiB", "seq_len": 1024}, ctx)
    assert res["recommended"]["fits"] and res["overrides"]["training.micro_batch_size"] >= 1
    json.dumps(res)  # wire-safe: plain maps, lists, numbers, strings


def test_worker_command_writes_a_config_under_the_run_root(tmp_path: Path) -> None:
    ctx = SimpleNamespace(runs_root=tmp_path)
    res = plan_command({"model": "deepseek-coder-6.7b", "gpus": "1x16GiB", "write_config": "plans/a.yaml"}, ctx)
    cfg = validate_config(yaml.safe_load((tmp_path / "plans" / "a.yaml").read_text()))
    assert res["written"]["config_path"] == str(tmp_path / "plans" / "a.yaml")
    assert cfg.quantization.mode == "nf4" and cfg.training.micro_batch_size == res["recommended"]["micro_batch"]


@pytest.mark.parametrize(("args", "field"), [
    ({"write_config": "../escape.yaml"}, "write_config"), ({"probe": True}, "probe"),
    ({"gpus": 2}, "gpus"), ({"seq_len": "long"}, "seq_len"), ({"margin": 2.0}, "margin"),
    ({"bogus": 1}, "bogus"), ({"model": "/etc"}, "model"), ({"cpu_ram": "x"}, "cpu_ram"),
])
def test_worker_command_rejects_bad_args_naming_the_field(tmp_path: Path, args: dict, field: str) -> None:
    ctx = SimpleNamespace(runs_root=tmp_path, emit=lambda *a, **k: None)
    with pytest.raises(CommandError) as err:
        plan_command(args, ctx)
    assert err.value.code in ("invalid_args", "not_available") and field in err.value.message


def test_worker_command_reads_a_model_dir_under_the_run_root(tmp_path: Path) -> None:
    d = tmp_path / "models" / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 688,
        "vocab_size": 4096}))
    res = plan_command({"model": str(d), "gpus": "1x8GiB"}, SimpleNamespace(runs_root=tmp_path))
    assert res["model"]["hidden"] == 256 and res["recommended"]["fits"]


# ---- train guard ----------------------------------------------------------------

def test_guard_refuses_and_suggests_the_nearest_fit() -> None:
    cfg = validate_config({"model": {"name_or_path": "deepseek-ai/deepseek-coder-6.7b-base"},
                           "data": {"seq_len": 2048}, "training": {"micro_batch_size": 4}})
    t = time.perf_counter()
    rep = check_config(cfg, [GPU16])
    assert time.perf_counter() - t < 0.2
    assert not rep.fits and "will not fit" in rep.message and rep.estimate["gpu_total"] > 16 * GIB
    assert rep.nearest_fit and rep.nearest_fit["model.gradient_checkpointing"] is True
    fixed = validate_config(cfg.to_dict(), rep.nearest_fit)
    # the suggestion keeps the effective batch and does fit
    assert (fixed.training.micro_batch_size * fixed.training.grad_accum_steps
            >= cfg.training.micro_batch_size * cfg.training.grad_accum_steps)
    assert check_config(fixed, [GPU16]).fits


def test_guard_accepts_what_fits_and_the_cpu_default() -> None:
    cfg = validate_config({"model": {"name_or_path": "deepseek-coder-1.3b"}, "data": {"seq_len": 1024},
                           "training": {"micro_batch_size": 1}})
    assert check_config(cfg, [GPU16]).fits
    tiny = check_config(validate_config({}), [])  # builtin:tiny-llama on CPU
    assert tiny.fits and tiny.checked and "RAM" in tiny.message


def test_guard_on_two_gpus_with_deepspeed_preset(tmp_path: Path) -> None:
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    cfg = validate_config({"model": {"name_or_path": "deepseek-coder-6.7b", "gradient_checkpointing": True},
                           "lora": {"enabled": False}, "data": {"seq_len": 512},
                           "training": {"micro_batch_size": 1, "grad_accum_steps": 2},
                           "distributed": {"nproc": 2, "backend": "deepspeed", "deepspeed_config": str(ds)}})
    rep = check_config(cfg, [GPU16, dict(GPU16, index=1)])
    assert rep.estimate["strategy"] == "zero3_offload"
    assert check_config(cfg, [GPU16]).fits is False  # two processes, one GPU


def test_guard_unknown_model_is_not_refused() -> None:
    cfg = validate_config({"model": {"name_or_path": "someone/not-cached"}})
    rep = check_config(cfg, [GPU16])
    assert rep.fits and not rep.checked and "not checked" in rep.message


@pytest.mark.slow
def test_probe_child_runs_the_candidate_on_cpu() -> None:
    """The probe's model-building and step code, run for real in its child process (CPU dry run)."""
    pytest.importorskip("peft")
    from dataclasses import asdict

    from uff_port.planner.arch import BUILTIN
    from uff_port.planner.estimate import Candidate, Workload
    from uff_port.planner.probe import run_one

    for method, ckpt in (("lora", True),):
        spec = {"arch": asdict(BUILTIN["builtin:tiny-llama"]),
                "candidate": asdict(Candidate(method, "single", 1, ckpt, 2)),
                "workload": asdict(Workload(seq_len=64, device="cpu")), "device": "cpu"}
        got = run_one(spec, timeout=120)
        assert got.get("steps") == 3 and got["loss"] == got["loss"], got  # ran, finite loss
    bad = dict(spec, candidate=asdict(Candidate("lora", "single", 1, False, 1)), device="cuda")
    got = run_one(bad, timeout=120)
    assert "error" in got or got.get("max_memory_reserved")  # no GPU: a clean error, not a hang


_arg_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                        st.text(max_size=12), st.sampled_from(["2x16GiB", "16GB", "none", "lora,qlora",
                                                               "deepseek-coder-1.3b", "eager", "64GiB"]),
                        st.lists(st.sampled_from(["lora", "full", "x"]), max_size=3))


@given(st.dictionaries(st.sampled_from(["model", "gpus", "cpu_ram", "seq_len", "micro_batch_max", "margin",
                                        "methods", "lora_r", "global_batch", "attn", "revision", "other"]),
                       _arg_values, max_size=6))
@settings(max_examples=150, deadline=None)
def test_worker_command_any_args_give_a_result_or_invalid_args(args: dict) -> None:
    args.setdefault("model", "deepseek-coder-1.3b")
    try:
        res = plan_command(args, SimpleNamespace(runs_root=Path("/nonexistent-root")))
    except CommandError as exc:
        assert exc.code == "invalid_args" and ":" in exc.message
        return
    json.dumps(res)
    assert isinstance(res["candidates"], list)


def test_guard_reads_the_reduce_bucket_of_the_deepspeed_config(tmp_path: Path) -> None:
    def peak(bucket: int) -> int:
        ds = tmp_path / f"z2-{bucket}.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": bucket}}))
        cfg = validate_config({"model": {"name_or_path": "deepseek-coder-1.3b", "gradient_checkpointing": True},
                               "lora": {"enabled": False}, "data": {"seq_len": 512},
                               "training": {"micro_batch_size": 1, "grad_accum_steps": 2},
                               "distributed": {"nproc": 2, "backend": "deepspeed", "deepspeed_config": str(ds)}})
        rep = check_config(cfg, [GPU16, dict(GPU16, index=1)])
        assert rep.estimate["strategy"] == "zero2"
        return rep.estimate["gpu"]["gradients"]

    # the bucket buffer is 2 bytes per element, on top of this rank's shard of the gradients
    assert peak(500_000_000) - peak(50_000_000) == 2 * 450_000_000
