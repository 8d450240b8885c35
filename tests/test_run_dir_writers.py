"""One writer per run directory, across workers: a second worker waits or is refused, never
resumes from a checkpoint the first pruned; an orphaned (stopped) trainer is reclaimed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from worker_jobs import BUSY, gone

from uff_port.client import WorkerClient, WorkerError

pytestmark = pytest.mark.slow
# A checkpoint every step and only the newest kept: any stale resume point is pruned at once.
PRUNING = {**BUSY, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1}


def _train(w: WorkerClient, timeout: float = 30, **extra: object) -> dict:
    return w.request(
        "train", {"config_path": "tiny", "run_dir": "job", "overrides": {**PRUNING, **extra}}, timeout=timeout
    )


def _wait_step(w: WorkerClient, step: int, since: int = 0) -> dict:
    return w.wait_event(lambda e: e.get("event") == "progress" and e.get("step", 0) >= step, 180, since)


def test_a_second_worker_waits_for_the_first_and_resumes_from_its_last_checkpoint(runs_root: Path) -> None:
    with WorkerClient(runs_root=runs_root, heartbeat_interval=0.5) as first, \
            WorkerClient(runs_root=runs_root, heartbeat_interval=0.5) as second:  # fmt: skip
        _train(first)
        _wait_step(first, 3)
        # While the first trains, the second is refused after its (short) grace period ...
        with pytest.raises(WorkerError) as busy:
            _train(second, **{"checkpoint.grace_seconds": 2})
        assert busy.value.code == "busy" and busy.value.details["writer_pid"]
        assert second.events_named("checkpoint_quarantined") == []
        # ... and with a longer one it waits: the first stops meanwhile, pruning as it saves.
        result: dict = {}
        waiting = threading.Thread(target=lambda: result.update(_train(second, timeout=150)))
        waiting.start()
        time.sleep(1.0)
        stopped = first.request("stop", timeout=120)
        waiting.join(150)
        assert result, "the second worker never answered its train"
        # The resume point was chosen under the lock, after the first let go: its final checkpoint.
        assert result["resumed_from"] == stopped["step"]
        since = len(second.events)
        _wait_step(second, stopped["step"] + 2, since)
        assert second.events_named("failed") == [] and second.events_named("checkpoint_quarantined") == []
        second.request("stop", {"checkpoint": False}, timeout=120)


def test_the_wait_for_a_live_writer_is_capped_at_the_workers_grace(runs_root: Path) -> None:
    # hello's command_info promises `train` a reply within --grace-seconds plus a margin; a
    # config asking for a longer grace must not break that promise.
    with WorkerClient(runs_root=runs_root, heartbeat_interval=0.5) as first, \
            WorkerClient(runs_root=runs_root, heartbeat_interval=0.5, extra_args=["--grace-seconds", "3"]) as second:  # fmt: skip
        _train(first)
        _wait_step(first, 2)
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as busy:
            _train(second, timeout=60, **{"checkpoint.grace_seconds": 600})
        waited = time.monotonic() - t0
        assert busy.value.code == "busy" and 3 <= waited < 20, waited
        assert second.hello["command_info"]["train"]["deadline_s"] < 60
        first.request("stop", {"checkpoint": False}, timeout=120)


def test_a_restarted_worker_reclaims_a_run_from_a_stopped_orphan(runs_root: Path) -> None:
    first = WorkerClient(runs_root=runs_root, heartbeat_interval=0.5)
    try:
        _train(first, **{"checkpoint.every_steps": None})
        _wait_step(first, 2)
        trainer = psutil.Process(first.pid).children()[0]
        trainer.send_signal(signal.SIGSTOP)  # frozen: it will never hear that its worker died
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        first.kill()
    assert trainer.status() == psutil.STATUS_STOPPED
    with WorkerClient(runs_root=runs_root, heartbeat_interval=0.5) as second:
        t0 = time.monotonic()
        started = _train(second, timeout=120, **{"checkpoint.every_steps": None, "checkpoint.grace_seconds": 60})
        assert time.monotonic() - t0 < 60, "reclaiming waited out the whole grace period"
        reclaimed = second.wait_event(lambda e: e.get("code") == "orphan_reclaimed", timeout=5)
        assert reclaimed["pid"] == trainer.pid
        # The orphan was woken and stopped the usual way: with a checkpoint, which is resumed.
        assert started["resumed_from"] is not None and started["resumed_from"] >= 2
        assert gone([trainer.pid], 10)
        _wait_step(second, started["resumed_from"] + 1, len(second.events) - 1)
        kids = [p.pid for p in psutil.Process(second.pid).children(recursive=True)]
        second.request("stop", {"checkpoint": False}, timeout=120)
        assert second.shutdown() == 0
    assert gone([trainer.pid, *kids], 10), "a process was left behind"
