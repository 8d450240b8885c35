"""Symlinks planted in a run directory are never followed out of it: not by the worker, the
trainer, the checkpoint store or the registry. Each attack goes through the real worker or CLI,
and the files outside must be byte for byte what they were."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from worker_jobs import BUSY

from uff_port.client import WorkerClient, WorkerError

pytestmark = pytest.mark.slow


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: what must not change."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files outside the runs root, shaped like what an attacker would point at."""
    out = tmp_path / "outside"
    step = out / "ckpts" / "step-00000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text('{"format": 1, "step": 2, "files": {"a.bin": {"sha256": "0", "size": 1}}}')
    (step / "a.bin").write_bytes(b"x")
    (out / "ckpts" / "LATEST").write_text("step-00000002\n")
    (out / "events.jsonl").write_text("precious line\n")
    (out / "trainer.log").write_text("precious log\n")
    (out / "secret.txt").write_text("TOPSECRET\n")
    return out


def _train(w: WorkerClient, run_dir: str, **extra: object) -> dict:
    return w.request("train", {"config_path": "tiny", "run_dir": run_dir, "overrides": {**BUSY, **extra}}, timeout=60)


def test_a_run_dir_with_a_symlink_out_is_refused_before_a_job_starts(
    worker: WorkerClient, runs_root: Path, outside: Path
) -> None:
    before = tree(outside)
    for name, target in (("checkpoints", outside / "ckpts"), ("events.jsonl", outside / "events.jsonl"),
                         ("trainer.log", outside / "trainer.log")):  # fmt: skip
        run = runs_root / f"run-{name.replace('.', '-')}"
        run.mkdir()
        (run / name).symlink_to(target)
        with pytest.raises(WorkerError) as refused:
            _train(worker, run.name)
        assert refused.value.code == "unsafe_path", refused.value
        assert refused.value.details["path"] == str(run / name)
        assert "TOPSECRET" not in refused.value.message
        assert worker.request("status")["state"] == "idle"
    assert tree(outside) == before


def test_symlinks_planted_mid_run_are_not_written_through(worker: WorkerClient, runs_root: Path, outside: Path) -> None:
    before = tree(outside)
    _train(worker, "job")
    worker.wait_event(lambda e: e.get("event") == "progress" and e.get("step", 0) >= 2, timeout=180)
    run = runs_root / "job"
    # events.jsonl becomes a link to a file outside; the trainer appends to it at every event.
    (run / "events.jsonl").unlink()
    (run / "events.jsonl").symlink_to(outside / "events.jsonl")
    # checkpoints/ becomes a link to a directory outside; the next checkpoint would go there.
    os.rename(run / "checkpoints", run / "checkpoints.moved") if (run / "checkpoints").exists() else None
    (run / "checkpoints").symlink_to(outside / "ckpts")
    since = len(worker.events)
    worker.wait_event(lambda e: e.get("event") == "progress", timeout=60, since=since)
    with pytest.raises(WorkerError):
        worker.request("checkpoint", timeout=120)
    failed = worker.wait_event("failed", timeout=60)
    assert failed["code"] == "unsafe_path" and "checkpoints" in failed["message"]
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=60)
    assert tree(outside) == before


def test_register_refuses_a_symlink_in_final(worker: WorkerClient, runs_root: Path, outside: Path, tmp_path: Path) -> None:
    before = tree(outside)
    _train(worker, "job", **{"training.max_steps": 2})
    assert worker.wait_event(lambda e: e.get("event") in ("finished", "failed"), timeout=180)["event"] == "finished"
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=60)
    final = runs_root / "job" / "final"
    (final / "artifact.json").unlink()  # so register hashes final/ afresh, link included
    (final / "notes.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(WorkerError) as refused:
        worker.request("register", {"run_dir": "job"}, timeout=120)
    assert refused.value.code == "unsafe_path" and "notes.txt" in refused.value.message
    registry = tmp_path / "registry"
    cli = subprocess.run(
        [sys.executable, "-m", "uff_port", "register", str(runs_root / "job"), "--registry", str(registry)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 10 and "unsafe_path" in cli.stderr, cli.stderr
    for reg in (registry, runs_root / "registry"):
        copied = [p for p in reg.rglob("*") if p.is_file() and b"TOPSECRET" in p.read_bytes()] if reg.exists() else []
        assert copied == []
    assert tree(outside) == before


def test_the_trainer_refuses_a_linked_config_or_events_file(tmp_path: Path, outside: Path) -> None:
    """The trainer started by hand (or racing the worker's checks) refuses too, before training."""
    root = Path(__file__).resolve().parents[1]
    (outside / "config.yaml").write_text((root / "configs" / "tiny.yaml").read_text())
    before = tree(outside)
    for name in ("config.yaml", "events.jsonl"):
        run = tmp_path / f"run-{name}"
        run.mkdir()
        (run / name).symlink_to(outside / name)
        proc = subprocess.run(
            [sys.executable, "-m", "uff_port.training", "--run-dir", str(run)]
            + ([] if name == "config.yaml" else ["--config", str(root / "configs" / "tiny.yaml")]),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 3, proc.stderr[-2000:]
    assert tree(outside) == before
