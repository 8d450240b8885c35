"""The worker driving the real trainer: stop, checkpoint, restart-resume, and every exit path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from worker_jobs import BUSY, gone

from uff_port.client import WorkerClient, WorkerError

pytestmark = pytest.mark.slow
HELPERS = Path(__file__).parent / "helpers"


def _train(w: WorkerClient, run_dir: str = "job", **extra: object) -> dict:
    return w.request("train", {"config_path": "tiny", "run_dir": run_dir, "overrides": {**BUSY, **extra}})


def _wait_step(w: WorkerClient, step: int, timeout: float = 180) -> dict:
    return w.wait_event(lambda e: e.get("event") == "progress" and e.get("step", 0) >= step, timeout)


def _training_tree(w: WorkerClient) -> list[int]:
    """Starts the default job, waits for step 2; the pids of the worker's descendants (the trainer)."""
    _train(w)
    _wait_step(w, 2)
    return [p.pid for p in psutil.Process(w.pid).children(recursive=True)]


def _latest(run_dir: Path) -> Path:
    name = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    path = run_dir / "checkpoints" / name
    assert (path / "manifest.json").is_file()
    return path


def test_stop_then_train_again_resumes(worker: WorkerClient, runs_root: Path) -> None:
    started = _train(worker)
    assert started["resumed_from"] is None and started["job_id"] == "job"
    _wait_step(worker, 3)
    beat = worker.wait_event(
        lambda e: e.get("event") == "heartbeat" and e.get("state") == "training" and e.get("step"), timeout=30
    )
    assert beat["job_id"] == "job" and beat["last_progress_ts"] > 0 and "host" in beat
    with pytest.raises(WorkerError) as busy:
        _train(worker)
    assert busy.value.code == "busy"
    status = worker.request("status")
    assert status["state"] == "training" and status["job_id"] == "job" and status["max_steps"] == 400
    stopped = worker.request("stop", timeout=120)
    assert stopped["exit_status"] == 75 and stopped["checkpoint"]
    assert Path(stopped["checkpoint"]) == _latest(runs_root / "job")
    step = stopped["step"]
    again = _train(worker)
    assert again["resumed_from"] == step
    worker.request("stop", {"checkpoint": False}, timeout=120)


def test_checkpoint_command_replies_when_durable(worker: WorkerClient, runs_root: Path) -> None:
    _train(worker)
    _wait_step(worker, 2)
    result = worker.request("checkpoint", timeout=120)
    path = Path(result["path"])
    assert (path / "manifest.json").is_file() and result["step"] >= 2
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == result["step"]
    worker.request("stop", {"checkpoint": False}, timeout=120)


def test_resume_command_picks_a_checkpoint(worker: WorkerClient, runs_root: Path) -> None:
    _train(worker)
    _wait_step(worker, 2)
    first = worker.request("checkpoint", timeout=120)["step"]
    worker.request("stop", timeout=120)
    resumed = worker.request("resume", {"run_dir": "job", "checkpoint": first})
    assert resumed["resumed_from"] == first
    worker.request("stop", {"checkpoint": False}, timeout=120)
    with pytest.raises(WorkerError) as exc:
        worker.request("resume", {"run_dir": "job", "checkpoint": 999999})
    assert exc.value.code == "not_found"


def test_changed_config_on_same_run_dir_is_refused(worker: WorkerClient) -> None:
    _train(worker)
    _wait_step(worker, 2)
    worker.request("stop", timeout=120)
    with pytest.raises(WorkerError) as exc:
        _train(worker, **{"lora.r": 4})
    assert exc.value.code == "invalid_config"
    assert "lora.r" in exc.value.message


def test_eof_while_training_checkpoints_and_exits_75(worker: WorkerClient, runs_root: Path) -> None:
    kids = _training_tree(worker)
    worker.close_stdin()
    assert worker.wait(120) == 75
    assert gone(kids, 10)
    _latest(runs_root / "job")


def test_sigterm_while_training_checkpoints_and_exits_75(worker: WorkerClient, runs_root: Path) -> None:
    kids = _training_tree(worker)
    t0 = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(120) == 75
    assert time.monotonic() - t0 < 100  # inside the default grace period
    assert gone(kids, 10)
    ckpt = _latest(runs_root / "job")
    assert json.loads((ckpt / "manifest.json").read_text())["step"] >= 2


def test_a_burst_of_sigterms_still_checkpoints_and_exits_75(worker: WorkerClient, runs_root: Path) -> None:
    kids = _training_tree(worker)
    for _ in range(300):  # the handler runs inside itself: it must take no lock
        os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(120) == 75
    assert gone(kids, 10)
    _latest(runs_root / "job")


def test_sigkill_of_the_worker_leaves_no_trainer_behind(worker: WorkerClient, runs_root: Path) -> None:
    """The supervisor's SIGKILL: the orphaned trainer checkpoints and exits by itself."""
    kids = _training_tree(worker)
    assert kids
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(30)
    assert gone(kids, 90), "the trainer outlived its worker"
    ckpt = _latest(runs_root / "job")
    assert json.loads((ckpt / "manifest.json").read_text())["step"] >= 2


def test_trainer_crash_is_reported_failed_and_worker_lives(worker: WorkerClient) -> None:
    _train(worker)
    _wait_step(worker, 2)
    trainer = psutil.Process(worker.pid).children()[0]
    trainer.send_signal(signal.SIGKILL)
    failed = worker.wait_event("failed", timeout=60)
    assert failed["code"] == "trainer_failed" and "signal 9" in failed["message"]
    assert failed["job_id"] == "job"
    idle = worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30)
    assert idle["outcome"] == "failed"
    assert worker.request("status")["state"] == "idle"


def test_a_dead_stdout_reader_does_not_stall_the_shutdown(runs_root: Path) -> None:
    """The VM died mid-event: writes to stdout fail, and the worker still stops at once."""
    from uff_port.protocol import FrameReader, decode_payload, encode_frame

    proc = subprocess.Popen(
        [sys.executable, "-m", "uff_port", "serve", "--runs-root", str(runs_root), "--heartbeat-interval", "0.05"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(encode_frame({"id": 1, "cmd": "train", "args": {"config_path": "tiny", "run_dir": "job", "overrides": BUSY}}))
        proc.stdin.flush()
        reader = FrameReader(proc.stdout.fileno())
        while True:  # until the trainer steps
            payload = reader.read()
            assert payload is not None
            if decode_payload(payload).get("event") == "progress":
                break
        kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.stdout.close()  # events and heartbeats now fail with EPIPE
        time.sleep(0.5)
        proc.stdin.close()  # then EOF: checkpoint and exit
        assert proc.wait(60) == 75
        assert gone(kids, 10)
        _latest(runs_root / "job")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_orphans_when_the_parent_is_killed_9(runs_root: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, str(HELPERS / "parent_of_worker.py"), str(runs_root), json.dumps(BUSY)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        pids = json.loads(line)
        tree = [pids["worker"], *pids["children"]]
        assert pids["children"], "worker should have a trainer child while busy"
        parent.kill()  # SIGKILL: the VM dies without a word
        parent.wait()
        assert gone(tree, 110), f"orphans left: {[p for p in tree if psutil.pid_exists(p)]}"
        _latest(runs_root / "job")  # the trainer saved on its way out
    finally:
        if parent.poll() is None:
            parent.kill()


def test_finished_job_reports_and_writes_artifact_manifest(worker: WorkerClient, runs_root: Path) -> None:
    _train(worker, **{"training.max_steps": 3})
    finished = worker.wait_event("finished", timeout=180)
    assert finished["step"] == 3 and finished["job_id"] == "job"
    # One shape for last_checkpoint everywhere (status, last_job, failed, finished).
    assert finished["last_checkpoint"] == {"step": 3, "path": str(runs_root / "job" / "checkpoints" / "step-00000003")}
    artifact = worker.wait_event("artifact", timeout=60)
    manifest = json.loads((runs_root / "job" / "final" / "artifact.json").read_text())
    assert artifact["artifact_id"] == manifest["artifact_id"]
    idle = worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30)
    assert idle["outcome"] == "finished" and idle["exit_status"] == 0
    last = worker.request("status")["last_job"]
    assert last["outcome"] == "finished" and last["step"] == 3
    assert last["last_checkpoint"] == finished["last_checkpoint"]


def test_checkpoint_right_after_finished_is_no_job(worker: WorkerClient, runs_root: Path) -> None:
    """The trainer winds down after `finished`: a checkpoint then is `no_job`, not a trainer failure."""
    worker.request("train", {"config_path": "tiny", "run_dir": "fin", "overrides": {
        "training.max_steps": 2, "data.seq_len": 64, "eval.every_steps": None, "checkpoint.every_steps": None}})
    worker.wait_event(lambda e: e.get("event") in ("finished", "failed"), 180)
    assert worker.events_named("finished")
    with pytest.raises(WorkerError) as err:
        worker.request("checkpoint", timeout=60)
    assert err.value.code == "no_job", err.value
