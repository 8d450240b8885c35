"""The worker's one job slot: its state word, the job, the last job, the exit.

Four threads change it: the request loop (`train`, `stop`, `shutdown`), the
job-start thread (the trainer started, or could not be), the job's thread (the
trainer exited) and the exit sequence (EOF, a signal, the parent's death). Every
change is one named transition under one lock, and each emits its `state` event
while holding it, so the events' order is the order of the transitions.

```
idle --begin_start--> starting --started--> training --stopping--> stopping
  ^                      |                     |                      |
  +------start_failed----+                     +------job_exited------+--> idle
any --begin_exit--> shutting_down (for good; job_exited then leaves the state alone)
```
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from uff_port.protocol.errors import CommandError, ErrorCode

if TYPE_CHECKING:
    from uff_port.server.jobs import Job

# Worker states (the `state` field of status, heartbeat and state events).
IDLE: Final = "idle"
STARTING: Final = "starting"
TRAINING: Final = "training"
STOPPING: Final = "stopping"
SHUTTING_DOWN: Final = "shutting_down"

Emit = Callable[..., None]


class JobSlot:
    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._idle_or_running = threading.Condition(self._lock)  # notified when `starting` ends
        self._state = IDLE
        self._job: Job | None = None
        self._starting = False
        self._last_job: dict[str, Any] | None = None
        self._exit_reason: str | None = None

    # -- reads (each a consistent view) ------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def job(self) -> Job | None:
        with self._lock:
            return self._job

    @property
    def starting(self) -> bool:
        with self._lock:
            return self._starting

    @property
    def exit_reason(self) -> str | None:
        """Why the worker is exiting; None while it is not."""
        with self._lock:
            return self._exit_reason

    def view(self) -> tuple[str, Job | None, dict[str, Any] | None]:
        """(state, job, last_job) read together, for status and heartbeats."""
        with self._lock:
            return self._state, self._job, self._last_job

    def active_job(self) -> Job:
        with self._lock:
            if self._job is None:
                raise CommandError(ErrorCode.NO_JOB, "no job is running", {"state": self._state})
            return self._job

    # -- transitions ---------------------------------------------------------------
    def _set(self, state: str, **fields: Any) -> None:
        self._state = state
        job_id = self._job.info.job_id if self._job else fields.pop("job_id", None)
        fields.pop("job_id", None)
        self._emit("state", state=state, job_id=job_id, **fields)

    def _refuse_if_busy(self) -> None:
        if self._job is not None or self._starting:
            running = self._job.info.job_id if self._job else None
            raise CommandError(
                ErrorCode.BUSY,
                f"a job is already {self._state} ({running}); send stop first",
                {"job_id": running, "state": self._state},
            )

    def begin_start(self, job_id: str) -> None:
        """idle -> starting; `busy` if a job is running or starting."""
        with self._lock:
            self._refuse_if_busy()
            self._starting = True
            self._set(STARTING, job_id=job_id)

    def check_idle(self) -> None:
        """Raise `busy` unless idle: the cheap check before a request is validated."""
        with self._lock:
            self._refuse_if_busy()

    def start_failed(self) -> None:
        """starting -> idle: the trainer could not be started."""
        with self._lock:
            self._starting = False
            self._idle_or_running.notify_all()
            if self._exit_reason is None:
                self._set(IDLE)

    def started(self, job: Job) -> None:
        """starting -> training."""
        with self._lock:
            self._job = job
            self._starting = False
            self._idle_or_running.notify_all()
            if self._exit_reason is None:
                self._set(TRAINING, run_dir=str(job.info.run_dir), resumed_from=job.info.resumed_from)

    def stopping(self) -> Job:
        """training -> stopping; `no_job` when there is none."""
        with self._lock:
            if self._job is None:
                raise CommandError(ErrorCode.NO_JOB, "no job is running", {"state": self._state})
            self._set(STOPPING)
            return self._job

    def job_exited(self, job: Job, last_job: dict[str, Any]) -> None:
        """training/stopping -> idle; the exit sequence keeps its own state word."""
        with self._lock:
            self._last_job = last_job
            if self._job is job:
                self._job = None
            if self._exit_reason is None:
                self._set(IDLE, job_id=job.info.job_id, outcome=last_job["outcome"], exit_status=last_job["exit_status"])

    def begin_exit(self, reason: str) -> bool:
        """any -> shutting_down; False if an exit has already begun (the first reason stands)."""
        with self._lock:
            if self._exit_reason is not None:
                return False
            self._exit_reason = reason
            return True

    def shutting_down(self, reason: str) -> None:
        with self._lock:
            self._set(SHUTTING_DOWN, reason=reason)

    def wait_started(self, timeout: float) -> Job | None:
        """Wait (up to `timeout`) for a job being started to run or fail; then the job, if any."""
        with self._lock:
            self._idle_or_running.wait_for(lambda: not self._starting, timeout)
            return self._job
