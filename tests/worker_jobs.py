"""What the tests that drive a training job through the real worker share."""

from __future__ import annotations

import time
from typing import Any, Final

import psutil

# Steps of a fraction of a second, checkpoints only when asked: the job stays busy.
BUSY: Final[dict[str, Any]] = {
    "training.max_steps": 400,
    "data.seq_len": 64,
    "training.micro_batch_size": 2,
    "training.grad_accum_steps": 1,
    "checkpoint.every_steps": None,
    "eval.every_steps": None,
    "training.progress_every_seconds": 0.0,
}


def gone(pids: list[int], timeout: float) -> bool:
    """True once none of `pids` is alive (zombies count as gone) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False
