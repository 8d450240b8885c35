"""Training that must stop rather than waste the GPU: non-finite numbers and a full disk.

Real runs of the tiny model through the real entry point and the real worker;
the full disk is a real, small tmpfs (root mounts one; elsewhere these tests skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_training_run import events_of, train, write_config
from uff_port.client import WorkerClient

NAN_AT = "UFF_PORT_INJECT_NONFINITE_AT_STEP"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ)
    e["UFF_PORT_CACHE"] = str(tmp_path_factory.getbasetemp() / "uff-cache")
    e["OMP_NUM_THREADS"] = "1"
    for k in ("UFF_PORT_INJECT_OOM_AT_STEP", NAN_AT):
        e.pop(k, None)
    return e


def _failed(run_dir: Path) -> dict[str, Any]:
    return next(e for e in reversed(events_of(run_dir)) if e["event"] == "failed")


# ---- non-finite training ------------------------------------------------------
@pytest.mark.slow
def test_a_diverging_run_fails_non_finite_and_keeps_its_last_good_checkpoint(tmp_path: Path, env: dict[str, str]) -> None:
    # A learning rate that is finite but absurd: step 1 blows the weights up, step 2's loss is NaN.
    rc, run_dir = train(tmp_path, "diverge", env, training__learning_rate=1e30, training__warmup_steps=0,
                        checkpoint__every_steps=1)  # fmt: skip
    assert rc == 1
    failed = _failed(run_dir)
    assert failed["code"] == "non_finite" and failed["resumable"] is False
    assert "learning_rate" in failed["message"]
    kinds = [e["event"] for e in events_of(run_dir)]
    assert "finished" not in kinds
    assert not (run_dir / "final").exists(), "a diverged run must not export an adapter"
    # Every committed checkpoint holds finite numbers (the bad step never reached the weights).
    assert (run_dir / "checkpoints" / "LATEST").exists()


@pytest.mark.slow
def test_skip_nonfinite_steps_drops_one_bad_batch_and_finishes(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "skip", {**env, NAN_AT: "3"}, training__skip_nonfinite_steps=1)
    assert rc == 0
    evs = events_of(run_dir)
    skipped = [e for e in evs if e.get("code") == "nonfinite_skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 3
    steps = [e["step"] for e in evs if e["event"] == "progress"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the step was retried on the next batch, not lost
    assert evs[-1]["event"] == "finished"


@pytest.mark.slow
def test_without_a_skip_budget_the_first_nan_fails_and_is_not_resumable(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "nan", {**env, NAN_AT: "5"})
    assert rc == 1
    failed = _failed(run_dir)
    assert failed["code"] == "non_finite" and failed["resumable"] is False and failed["step"] == 4
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000003"]  # the last good state, untouched
    # Raising the budget (resume-neutral) resumes past the bad batch from that checkpoint.
    rc, _ = train(tmp_path, "nan", {**env, NAN_AT: "5"}, training__skip_nonfinite_steps=2)
    assert rc == 0
    evs = events_of(run_dir)
    assert any(e.get("resumed_from") == 3 for e in evs) and evs[-1]["event"] == "finished"


def test_non_finite_config_numbers_are_refused_by_the_trainer(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "inf", env, training__learning_rate=float("inf"))
    assert rc == 3
    failed = _failed(run_dir)
    assert failed["code"] == "invalid_config" and "training.learning_rate" in failed["message"]


# ---- the registry reads the numbers -------------------------------------------
def _adapter_with(path: Path, value: float) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    w = np.ones((4, 4), dtype=np.float32)
    w[1, 2] = value
    save_file({"lora_A": w, "lora_B": np.zeros((4, 4), dtype=np.float16)}, str(path / "adapter_model.safetensors"))
    return path


def test_the_tensor_scan_finds_nan_and_inf_in_every_float_width(tmp_path: Path) -> None:
    import numpy as np

    from uff_port.registry.tensors import scan_tree

    good = _adapter_with(tmp_path / "good", 0.5)
    assert scan_tree(good).ok and scan_tree(good).tensors == 2
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("ninf", float("-inf"))):
        report = scan_tree(_adapter_with(tmp_path / name, value))
        assert report.nonfinite == ["adapter_model.safetensors:lora_A (1 of 16 values)"], name
    # bf16 as stored by torch: 0x7FC0 is NaN, 0xFF80 is -Inf, 0x7F7F the largest finite value.
    mixed = tmp_path / "bf16"
    mixed.mkdir()
    data = np.array([0x3F80, 0x7F7F, 0x7FC0, 0xFF80], dtype="<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, len(data)]}}).encode()
    (mixed / "a.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data)
    assert scan_tree(mixed).nonfinite == ["a.safetensors:w (2 of 4 values)"]


def test_a_hostile_safetensors_header_is_refused_not_followed(tmp_path: Path) -> None:
    from uff_port.registry.tensors import TensorFileError, scan_tree

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(TensorFileError, match="out of bounds"):
        scan_tree(bad)
    (bad / "a.safetensors").write_bytes((40).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[9],"data_offsets":[0,36]}}'[:40])
    with pytest.raises(TensorFileError):
        scan_tree(bad)


@pytest.mark.slow
def test_register_refuses_a_nan_adapter_and_promote_gates_on_weights(tmp_path: Path, env: dict[str, str]) -> None:
    from safetensors.numpy import load_file, save_file

    rc, run_dir = train(tmp_path, "ok", env, training__max_steps=2, checkpoint__every_steps=2, eval__every_steps=2)
    assert rc == 0
    reg = tmp_path / "registry"
    cli = [sys.executable, "-m", "uff_port.cli"]
    # Poison the adapter the way a diverged run would; its manifest is written afresh, so every hash matches.
    path = run_dir / "final" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first].flat[0] = float("nan")
    save_file(tensors, str(path))
    (run_dir / "final" / "artifact.json").unlink(missing_ok=True)
    res = subprocess.run([*cli, "register", str(run_dir), "--registry", str(reg)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 9, res.stdout + res.stderr
    assert "non_finite" in res.stdout + res.stderr and first in res.stdout + res.stderr


# ---- a full disk ----------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"uff-{uuid.uuid4().hex[:6]}", str(where)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take every free byte of `disk` but `leave`, in one file (deleted to free the space)."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        with contextlib.suppress(OSError):
            fh.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def test_train_on_a_full_disk_is_refused_with_disk_full(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = write_config(tmp_path / "cfg.yaml")
    with tmpfs(tmp_path / "disk", "2m") as disk:
        runs = disk / "runs"
        runs.mkdir()
        fill(disk, leave=64 * 1024)
        with WorkerClient(runs_root=runs, heartbeat_interval=0.5, env=env) as client:
            reply = client.call("train", {"config_path": str(cfg), "run_dir": "r1"})
            assert reply["ok"] is False and reply["error"]["code"] == "disk_full", reply
            assert "free" in reply["error"]["message"] and reply["error"]["details"]["needed"] > 0
            assert client.request("ping") is not None
            client.close_stdin()
            assert client.wait(30) == 0


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_stops_with_disk_full_and_resumes_once_freed(
    tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path / "full.yaml", training__max_steps=30, checkpoint__every_steps=2, eval__every_steps=None)
    with tmpfs(tmp_path / "disk", "80m") as disk, WorkerClient(runs_root=disk, heartbeat_interval=0.5, env=env) as client:
        args = {"config_path": str(cfg), "run_dir": "r"}
        client.request("train", args)
        client.wait_event("checkpoint", timeout=120)
        filler = fill(disk)  # every byte the next checkpoint would need
        failed = client.wait_event(lambda e: e.get("event") in ("failed", "finished"), timeout=180)
        assert failed["event"] == "failed" and failed["code"] == "disk_full", failed["message"]
        assert failed["resumable"] is True and failed["step"] < 30
        assert "free some space" in failed["message"].lower()
        run_dir = disk / "r"
        good = (run_dir / "checkpoints" / "LATEST").read_text().strip()
        assert (run_dir / "checkpoints" / good / "manifest.json").exists()
        # Space freed: the same train resumes from the last durable checkpoint and finishes.
        filler.unlink()
        for _ in range(300):  # the `failed` event comes before the trainer has exited
            if client.request("status")["state"] == "idle":
                break
            time.sleep(0.1)
        since = len(client.events)
        reply = client.request("train", args)
        assert reply["resumed_from"] == int(good.split("-")[1])
        done = client.wait_event(lambda e: e.get("event") in ("failed", "finished"), timeout=180, since=since)
        assert done["event"] == "finished" and done["step"] == 30, done
        client.close_stdin()
        assert client.wait(60) == 0
