"""First use: reproducible artifact ids, finished runs left alone, SIGHUP, dead-run status, early refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.client import WorkerClient

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# A few quick steps of the tiny model; no periodic checkpoints or evals.
QUICK = ["--set", "training.max_steps=2", "--set", "checkpoint.every_steps=null", "--set", "eval.every_steps=null",
         "--set", "data.seq_len=64", "--quiet"]
WIRE_QUICK: dict[str, Any] = {"training.max_steps": 2, "checkpoint.every_steps": None, "eval.every_steps": None,
                              "data.seq_len": 64, "training.progress_every_seconds": 0.0}


def cli(*args: str, cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "uff_port", *args], cwd=cwd, timeout=timeout, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


# ---- 1. deterministic artifact ids -------------------------------------------------------------

@pytest.mark.slow
def test_two_identical_runs_give_the_same_artifact_id_and_final_bytes(tmp_path: Path) -> None:
    ids = []
    for name in ("one", "two"):
        proc = cli("train", "tiny", "--run-dir", str(tmp_path / name), *QUICK)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids.append(json.loads((tmp_path / name / "final" / "artifact.json").read_text())["artifact_id"])
    assert ids[0] == ids[1]
    one, two = tree_digest(tmp_path / "one" / "final"), tree_digest(tmp_path / "two" / "final")
    one.pop("artifact.json"), two.pop("artifact.json")  # names its run (lineage), not content
    assert one == two
    adapter = (tmp_path / "one" / "final" / "adapter_config.json").read_text()
    modules = json.loads(adapter)["target_modules"]
    assert modules == sorted(modules) and len(modules) > 1
    from uff_port.hashing import canonical_json

    assert adapter == canonical_json(json.loads(adapter))


@pytest.mark.slow
def test_a_finished_run_dir_is_left_untouched_unless_fresh(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("train", "tiny", "--run-dir", str(run), *QUICK).returncode == 0
    before = tree_digest(run / "final")
    starts = sum(1 for e in events_of(run) if e.get("event") == "state" and e.get("state") == "loading")
    again = cli("train", "tiny", "--run-dir", str(run), *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert tree_digest(run / "final") == before  # no export, no new manifest
    evs = events_of(run)
    assert any(e.get("code") == "already_finished" for e in evs)
    assert sum(1 for e in evs if e.get("event") == "state" and e.get("state") == "loading") == starts  # no model load
    assert evs[-1]["event"] == "finished" and evs[-1]["step"] == 2
    resumed = cli("resume", str(run), "--quiet")
    assert resumed.returncode == 0 and tree_digest(run / "final") == before
    fresh = cli("train", "tiny", "--run-dir", str(run), "--fresh", *QUICK)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sum(1 for e in events_of(run) if e.get("event") == "state" and e.get("state") == "loading") == starts + 1
    after = tree_digest(run / "final")
    assert after["adapter_model.safetensors"] == before["adapter_model.safetensors"]  # same training, same bytes
    assert json.loads((run / "final" / "artifact.json").read_text())["artifact_id"] == json.loads(
        (tmp_path / "run" / "final" / "artifact.json").read_text())["artifact_id"]


@pytest.mark.slow
def test_worker_reports_a_finished_run_as_finished_and_fresh_trains_again(worker: WorkerClient, runs_root: Path) -> None:
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": WIRE_QUICK})
    first = worker.wait_event("artifact", timeout=180)
    final = runs_root / "job" / "final"
    before = tree_digest(final)
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30)
    n = len(worker.events)
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": WIRE_QUICK})
    second = worker.wait_event("artifact", timeout=120, since=n)
    assert second["artifact_id"] == first["artifact_id"]
    assert tree_digest(final) == before
    assert any(e.get("code") == "already_finished" for e in worker.events[n:])
    assert not any(e.get("event") == "progress" for e in worker.events[n:])
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30, since=n)
    n = len(worker.events)
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": WIRE_QUICK, "fresh": True})
    third = worker.wait_event("artifact", timeout=180, since=n)
    assert any(e.get("event") == "progress" and e.get("step") == 1 for e in worker.events[n:])
    assert third["artifact_id"] == first["artifact_id"]  # deterministic training: the same content id


# ---- 2. SIGHUP and the status of a dead run -----------------------------------------------------

LONG = ["--set", "training.max_steps=400", "--set", "checkpoint.every_steps=2", "--set", "eval.every_steps=null",
        "--set", "data.seq_len=64", "--set", "training.micro_batch_size=2", "--set", "training.grad_accum_steps=1",
        "--set", "training.progress_every_seconds=0"]


def wait_for(run_dir: Path, pred: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").exists():
            for ev in events_of(run_dir):
                if pred(ev):
                    return ev
        time.sleep(0.2)
    raise TimeoutError(f"no matching event in {run_dir} within {timeout}s")


def status(run_dir: Path) -> dict[str, Any]:
    proc = cli("status", str(run_dir), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_sighup_to_the_cli_process_group_checkpoints_and_exits_75(tmp_path: Path) -> None:
    run = tmp_path / "hup"
    proc = subprocess.Popen([PY, "-m", "uff_port", "train", "tiny", "--run-dir", str(run), *LONG], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(run, lambda e: e.get("event") == "progress" and e["step"] >= 3)
        os.killpg(proc.pid, signal.SIGHUP)  # what a closed terminal or a dropped SSH session sends
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err.decode()[-3000:]
    stopped = [e for e in events_of(run) if e.get("event") == "state" and e.get("state") == "stopped"]
    assert stopped and stopped[-1]["checkpoint"], "stopped without a checkpoint"
    info = status(run)
    assert info["state"] == "stopped" and not info["alive"] and info["resumes_from_step"] == stopped[-1]["step"]


@pytest.mark.slow
def test_sighup_to_the_cli_alone_is_passed_on_and_the_trainer_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "hup1"
    proc = subprocess.Popen([PY, "-m", "uff_port", "train", "tiny", "--run-dir", str(run), "--quiet", *LONG],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(run, lambda e: e.get("event") == "progress" and e["step"] >= 2)
        proc.send_signal(signal.SIGHUP)  # the CLI only: it must not die and leave the trainer unsaved
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err.decode()[-3000:]
    assert any(e.get("event") == "state" and e.get("state") == "stopped" and e.get("checkpoint") for e in events_of(run))


@pytest.mark.slow
def test_status_tells_a_sigkilled_trainer_from_a_running_one(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "uff_port.training", "--run-dir", str(run), "--config", "tiny", *LONG],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ckpt = wait_for(run, lambda e: e.get("event") == "checkpoint" and e.get("step", 0) >= 2)
        live = status(run)
        assert live["alive"] and live["pid"] == proc.pid and live["state"] in ("training", "checkpointing")
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    dead = status(run)
    assert dead["state"] == "dead" and not dead["alive"] and dead["pid"] is None
    assert dead["resumes_from_step"] >= ckpt["step"] and dead["resumes_from_step"] == dead["checkpoints"][-1]
    text = cli("status", str(run), timeout=60).stdout
    assert "no live trainer" in text and f"from step {dead['resumes_from_step']}" in text
