"""DeepSpeed ZeRO-2/3: real 2-process runs on CPU (gloo), killed and resumed for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_training_run import events_of, losses, write_config

from uff_port.training import zero

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ["distributed.backend=deepspeed", "distributed.nproc=2", "distributed.deepspeed_config=configs/deepspeed/zero2.json"]
DS2 = ["distributed.backend=deepspeed", "distributed.nproc=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ)
    e["UFF_PORT_CACHE"] = str(tmp_path_factory.getbasetemp() / "uff-cache")
    e["OMP_NUM_THREADS"] = "1"
    for k in ("UFF_PORT_INJECT_OOM_AT_STEP", "UFF_PORT_CHECKPOINT_KILL_AT"):
        e.pop(k, None)
    return e


def run(tmp: Path, name: str, env: dict[str, str], sets: list[str], extra_env: dict[str, str] | None = None) -> tuple[int, Path]:
    run_dir = tmp / name
    cfg = write_config(tmp / "base.yaml")
    argv = [sys.executable, "-m", "uff_port.training", "--run-dir", str(run_dir), "--config", str(cfg)]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, env={**env, **(extra_env or {})}, cwd=ROOT, timeout=280, capture_output=True, text=True)
    return proc.returncode, run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """One plain process, torch AdamW: what every DeepSpeed run must reproduce."""
    rc, run_dir = run(tmp_path_factory.mktemp("ref"), "ref", env, [])
    assert rc == 0
    return run_dir


@pytest.fixture(scope="module")
def reference_full_loss(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """The same with `training.loss: full`, which ZeRO-3 uses (docs/memory.md): the chunked
    loss of the plain run rounds differently in the last bits."""
    rc, run_dir = run(tmp_path_factory.mktemp("ref-full"), "ref", env, ["training.loss=full"])
    assert rc == 0
    return run_dir


def assert_same_losses(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].numel() > 0, k
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.long  # ~4 min on 2 cores; the worker's ZeRO-2 stop and resume stays in CI
def test_zero2_on_two_processes_killed_mid_commit_resumes_exactly(
    tmp_path: Path, env: dict[str, str], reference: Path
) -> None:
    rc, run_dir = run(tmp_path, "z2", env, ZERO2, {"UFF_PORT_CHECKPOINT_KILL_AT": "6:begun"})
    assert rc != 0
    ckpt = run_dir / "checkpoints" / "step-00000003"
    shards = sorted(p.name for p in (ckpt / zero.DS_TAG).iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["optimizer_layout"] == "deepspeed-zero2-world2"
    assert f"{zero.DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifest["files"]
    assert not (ckpt / "optimizer.pt").exists()

    rc, run_dir = run(tmp_path, "z2", env, ZERO2)
    assert rc == 0
    resumed = [e for e in events_of(run_dir) if e["event"] == "log" and e.get("resumed_from") is not None]
    assert [e["resumed_from"] for e in resumed] == [3]
    # Steps 1-3 from the first launch, 4-6 from the second: the later ones win in the dict.
    assert_same_losses(losses(run_dir), losses(reference))
    assert_same_adapter(run_dir / "final", reference / "final")

    # The sharded state resumes only with the same layout: a plain run refuses it by name.
    rc, _ = run(tmp_path, "z2", env, ["training.max_steps=9"])
    assert rc == 3
    failed = events_of(run_dir)[-1]
    assert failed["event"] == "failed" and failed["code"] == "checkpoint_mismatch"
    assert "deepspeed-zero2-world2" in failed["message"] and not failed["resumable"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero3.json", pytest.param("zero3-offload.json", marks=pytest.mark.long)])
def test_zero3_shards_weights_and_still_matches_one_process(
    tmp_path: Path, env: dict[str, str], reference_full_loss: Path, preset: str
) -> None:
    """ZeRO-3, and ZeRO-3 with parameters and optimizer on the host (DeepSpeed's CPU Adam)."""
    reference = reference_full_loss
    rc, run_dir = run(tmp_path, "z3", env, DS2 + [f"distributed.deepspeed_config=configs/deepspeed/{preset}"])
    assert rc == 0
    assert_same_losses(losses(run_dir), losses(reference))
    # Saved from gathered weights: whole tensors, equal to the unsharded run's.
    assert_same_adapter(run_dir / "final", reference / "final")
    ckpt = run_dir / "checkpoints" / "step-00000006"
    assert json.loads((ckpt / "manifest.json").read_text())["optimizer_layout"] == "deepspeed-zero3-world2"
    assert_same_adapter(ckpt, reference / "checkpoints" / "step-00000006")


def test_one_process_deepspeed_matches_plain_torch(tmp_path: Path, env: dict[str, str], reference: Path) -> None:
    rc, run_dir = run(tmp_path, "z1p", env, ["distributed.backend=deepspeed"])
    assert rc == 0
    assert_same_losses(losses(run_dir), losses(reference))


def test_missing_deepspeed_is_not_available_and_names_the_package(
    tmp_path: Path, env: dict[str, str], reference: Path
) -> None:
    # `reference` warms the tiny-model cache first: building the model goes through
    # accelerate, which imports deepspeed whenever its metadata is installed, shim or not.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "deepspeed.py").write_text("raise ImportError('deepspeed is not installed here')\n")
    path = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    rc, run_dir = run(tmp_path, "nods", {**env, "PYTHONPATH": path}, ["distributed.backend=deepspeed"])
    assert rc == 3
    failed = events_of(run_dir)[-1]
    assert failed["code"] == "not_available" and "uff-port[deepspeed]" in failed["message"]
    assert not failed["resumable"]


# -- the DeepSpeed JSON ----------------------------------------------------------


def fill(raw: dict[str, Any] | None, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"micro": 2, "accum": 4, "world": 2, "max_grad_norm": 1.0, "precision": "bf16"}
    kw.update(over)
    return zero.build_config(raw, **kw)


def test_auto_values_come_from_the_yaml() -> None:
    raw = json.loads((ROOT / "configs" / "deepspeed" / "zero3-offload.json").read_text())
    ds = fill(raw)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "_comment" not in ds and zero.stage_of(ds) == 3 and zero.offloads_optimizer(ds)
    assert zero.layout(ds, 2) == "deepspeed-zero3-world2"
    assert fill(None, precision="fp32")["zero_optimization"] == {"stage": 2}


def test_every_shipped_deepspeed_preset_fills() -> None:
    presets = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
    assert len(presets) >= 3
    for p in presets:
        ds = zero.load_config(str(p.relative_to(ROOT)), micro=1, accum=2, world=2, max_grad_norm=None, precision="fp16")
        assert ds["fp16"]["enabled"] is True and ds["gradient_clipping"] == 0.0


def test_explicit_values_that_contradict_the_yaml_are_refused_by_key() -> None:
    with pytest.raises(zero.ZeroError) as exc:
        fill({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5, "zero_optimization": {"stage": 7}})
    msg = exc.value.message
    assert exc.value.code == "invalid_config"
    assert "train_micro_batch_size_per_gpu: 8" in msg and "gradient_clipping: 0.5" in msg
    assert "zero_optimization.stage" in msg
    assert fill({"train_micro_batch_size_per_gpu": 2})["train_micro_batch_size_per_gpu"] == 2


def test_a_missing_or_broken_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(zero.ZeroError, match="distributed.deepspeed_config: no file at"):
        zero.load_config(str(tmp_path / "nope.json"), micro=1, accum=1, world=1, max_grad_norm=None, precision="fp32")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(zero.ZeroError, match="not valid JSON"):
        zero.load_config(str(bad), micro=1, accum=1, world=1, max_grad_norm=None, precision="fp32")


def test_shard_loading_refuses_anything_but_plain_data(tmp_path: Path) -> None:
    import argparse

    evil = tmp_path / "optim.pt"
    torch.save({"state": argparse.Namespace(x=1)}, evil)
    with pytest.raises(zero.ZeroError) as exc:
        zero.safe_load(evil, [])
    assert exc.value.code == "corrupt_checkpoint" and "argparse.Namespace" in exc.value.message
    fine = tmp_path / "fine.pt"
    torch.save({"w": torch.ones(2)}, fine)
    assert torch.equal(zero.safe_load(fine, [])["w"], torch.ones(2))


@pytest.mark.slow
def test_worker_stops_and_resumes_a_zero2_process_group(runs_root: Path) -> None:
    """Through the worker: stop checkpoints every shard, the group is gone, train resumes it."""
    import psutil

    from uff_port.client import WorkerClient

    over = {
        "training.max_steps": 400, "data.seq_len": 64, "training.micro_batch_size": 2,
        "training.grad_accum_steps": 2, "checkpoint.every_steps": None, "eval.every_steps": None,
        "training.progress_every_seconds": 0.0, "training.device": "cpu",
        "distributed.backend": "deepspeed", "distributed.nproc": 2,
        "distributed.deepspeed_config": "configs/deepspeed/zero2.json",
    }  # fmt: skip
    w = WorkerClient(runs_root=runs_root, heartbeat_interval=0.2, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        w.request("train", {"config_path": "tiny", "run_dir": "ds", "overrides": over})
        w.wait_event(lambda e: e.get("event") == "progress" and e.get("step", 0) >= 2, 240)
        group = [p.pid for p in psutil.Process(w.pid).children(recursive=True)]
        assert len(group) >= 4  # launcher, torchrun, two ranks
        stopped = w.request("stop", timeout=180)
        step = stopped["step"]
        ckpt = runs_root / "ds" / "checkpoints" / f"step-{step:08d}"
        assert (ckpt / zero.DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in group):
            assert time.monotonic() < deadline, "the process group outlived the stop"
            time.sleep(0.1)
        started = w.request("train", {"config_path": "tiny", "run_dir": "ds", "overrides": {**over, "training.max_steps": step + 2}})
        assert started["resumed_from"] == step
        done = w.wait_event("finished", timeout=240)
        assert done["step"] == step + 2
    finally:
        w.close_stdin()
        w.wait(120)
