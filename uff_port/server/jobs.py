"""One training job at a time: the trainer process group, its channel, its outcome.

The worker sends the trainer `checkpoint`/`stop`/`status` over the channel and
forwards every event it reports, adding `seq` and `job_id`. When the channel
closes, the exit status decides the outcome: 0 finished, 75 stopped with a
durable checkpoint, 3 refused, anything else a crash reported as `failed`.
Whatever the outcome, the whole process group is killed so nothing the trainer
started can linger and pin GPU memory.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port.core import layout
from uff_port.core.exits import ExitCode
from uff_port.fsutil import UnsafePath, open_confined
from uff_port.protocol.errors import ErrorCode
from uff_port.protocol.messages import failed_fields, finished_fields
from uff_port.server.children import Child
from uff_port.server.outbox import EventStream

# Events the trainer sends that pass through the rate limiter.
_LIMITED: Final = frozenset({"progress", "log"})

ReplyCallback = Callable[[dict[str, Any]], None]


@dataclass
class JobInfo:
    job_id: str
    run_dir: Path
    kind: str
    resumed_from: int | None
    grace_seconds: float = 100.0
    started_at: float = field(default_factory=time.time)
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    phase: str = "starting"
    last_progress_ts: float = field(default_factory=time.time)
    last_checkpoint: dict[str, Any] | None = None
    terminal_event: str | None = None
    exit_code: int | None = None


class Job:
    """A running trainer (or cloud runner) and the bookkeeping around it."""

    def __init__(
        self,
        info: JobInfo,
        argv: list[str],
        events: EventStream,
        on_exit: Callable[[Job], None],
        extra_argv: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.info = info
        self._events = events
        self._on_exit = on_exit
        self._ids = itertools.count(1)
        self._pending: dict[int, ReplyCallback] = {}
        self._lock = threading.Lock()
        self.exited = threading.Event()
        self.stop_requested = False
        self._exit_waiters: list[Callable[[Job], None]] = []
        self._events_log = info.run_dir / layout.EVENTS
        self.child = Child(
            argv,
            extra_argv=extra_argv,
            log_path=info.run_dir / layout.TRAINER_LOG,
            name=f"trainer[{info.job_id}]",
            pass_fds=pass_fds,
        )
        self._thread = threading.Thread(target=self._run, name=f"job-{info.job_id}", daemon=True)
        self._thread.start()

    # -- control ------------------------------------------------------------
    def control(self, cmd: str, args: dict[str, Any], on_reply: ReplyCallback) -> bool:
        """Send a command to the trainer; `on_reply` gets its reply frame (or an error)."""
        cid = next(self._ids)
        with self._lock:
            if self.exited.is_set():
                return False
            self._pending[cid] = on_reply
        if not self.child.send({"id": cid, "cmd": cmd, "args": args}):
            with self._lock:
                self._pending.pop(cid, None)
            return False
        return True

    def on_exit(self, callback: Callable[[Job], None]) -> None:
        """Run `callback(job)` once the trainer has exited (at once if it already has)."""
        with self._lock:
            if not self.exited.is_set():
                self._exit_waiters.append(callback)
                return
        callback(self)

    def close_channel(self) -> None:
        self.child.close_channel()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.child.signal_group(sig)

    # -- channel ------------------------------------------------------------
    def _run(self) -> None:
        broken = self.child.read_frames(self._on_frame_guarded)
        code = self.child.wait(timeout=None if broken is None else 5.0)
        if code is None:  # channel broke but the process lives on: it is not trustworthy
            self.kill()
            code = self.child.wait()
        # Reap anything the trainer started that outlived it (torchrun ranks, helpers).
        self.kill()
        self.info.exit_code = code
        self._finish(code if code is not None else -1, broken)

    def _on_frame_guarded(self, frame: dict[str, Any]) -> None:
        # This thread is what notices the trainer's exit: one bad frame or a failed
        # callback must not end it, or shutdown waits out its whole grace period.
        try:
            self._on_frame(frame)
        except Exception:  # noqa: BLE001 - reported on stderr, the relay goes on
            traceback.print_exc(file=sys.stderr)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if "reply_to" in frame:
            with self._lock:
                callback = self._pending.pop(frame.get("reply_to"), None)  # type: ignore[arg-type]
            if callback:
                callback(frame)
            return
        name = frame.get("event")
        if not isinstance(name, str):
            return
        fields = {k: v for k, v in frame.items() if k not in ("event", "seq")}
        fields["job_id"] = self.info.job_id
        self._track(name, fields)
        if name == "state":
            # The trainer's states are phases of the worker's `training` state.
            fields["phase"] = fields.get("state")
            fields["state"] = "training"
        if name in ("finished", "failed"):
            self._events.drain_progress()
        if name in _LIMITED:
            self._events.emit_limited(name, **fields)
        else:
            self._events.emit(name, **fields)

    def _track(self, name: str, fields: dict[str, Any]) -> None:
        info = self.info
        if name == "progress":
            step = fields.get("step")
            if isinstance(step, int) and step != info.step:
                info.last_progress_ts = time.time()
                info.step = step
            for key in ("max_steps", "loss", "lr", "tokens_per_s"):
                if key in fields:
                    setattr(info, key, fields[key])
            info.phase = "training"
        elif name == "state" and isinstance(fields.get("state"), str):
            info.phase = fields["state"]
            if fields["state"] == "training" and "resumed_from" in fields:
                # The trainer's word on where it resumed: it may have fallen back past the worker's choice.
                info.resumed_from = fields["resumed_from"]
        elif name == "checkpoint":
            info.last_checkpoint = {"step": fields.get("step"), "path": fields.get("path")}
        elif name in ("finished", "failed"):
            info.terminal_event = name
            if isinstance(fields.get("step"), int):
                info.step = fields["step"]

    def _log_event(self, name: str, fields: dict[str, Any]) -> None:
        """Worker-made events about the job also go to the run's events.jsonl."""
        try:  # never appended through a symlink out of the run directory
            with open_confined(self.info.run_dir, self._events_log, "a") as fh:
                fh.write(json.dumps({"event": name, "ts": time.time(), "source": "worker", **fields}) + "\n")
        except (OSError, UnsafePath):
            pass

    def _finish(self, code: int, broken: str | None) -> None:
        info = self.info
        self._events.drain_progress()
        tail = list(self.child.stderr_tail)
        fields: dict[str, Any]
        if code == ExitCode.OK and info.terminal_event is None:
            fields = finished_fields(step=info.step, job_id=info.job_id, loss=info.loss, run_dir=str(info.run_dir))
            self._events.emit("finished", **fields)
            self._log_event("finished", fields)
        elif code not in (ExitCode.OK, ExitCode.RESUMABLE) and info.terminal_event != "failed":
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            last = next((line for line in reversed(tail) if line.strip()), "")
            fields = failed_fields(
                ErrorCode.TRAINER_FAILED,
                f"trainer {how}" + (f": {last}" if last else "") + (f" ({broken})" if broken else ""),
                resumable=info.last_checkpoint is not None or info.resumed_from is not None,
                job_id=info.job_id,
                exit_status=code,
                stderr_tail=tail[-10:],
                step=info.step,
                last_checkpoint=info.last_checkpoint,
            )
            self._events.emit("failed", **fields)
            self._log_event("failed", fields)
        with self._lock:
            pending, self._pending = self._pending, {}
            self.exited.set()
            waiters, self._exit_waiters = self._exit_waiters, []
        gone = {
            "ok": False,
            "error": {
                "code": ErrorCode.TRAINER_FAILED,
                "message": f"trainer exited (status {code}) before it answered",
                "details": {"exit_status": code},
            },
        }
        # The worker forgets the job first, so a client that gets the stop reply
        # can send `train` at once without hitting `busy`.
        self._on_exit(self)
        for callback in pending.values():
            callback(gone)
        for waiter in waiters:
            waiter(self)


def trainer_argv(python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "uff_port.training"]


def cloud_argv(python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "uff_port.cloud", "run"]
