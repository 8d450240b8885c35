"""Crash-safe journal of one run's cloud job: what was submitted, where it stands.

Write-ahead: every transition is made durable (atomic write + directory
fsync) *before* the action it announces is taken, so a worker killed at any
point restarts knowing either that it had not acted yet or that it may have.
The second case is resolved by asking the provider about the deterministic
job name, never by submitting again.

States of a session:

    submitting -> submitted -> running -> completed | interrupted | failed | stopped
    completed | interrupted | stopped -> pulled -> verified   (or refused -> pulled again)

`submitting` is the intent record: the job name exists, the provider may or
may not know it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import atomic_write_json

JOURNAL_NAME: Final = "cloud/journal.json"

SESSION_STATES: Final = (
    "submitting",
    "submitted",
    "running",
    "completed",
    "interrupted",
    "failed",
    "stopped",
    "pulled",
    "refused",
    "verified",
)
REMOTE_DONE: Final = frozenset({"completed", "interrupted", "failed", "stopped"})
"""The provider no longer runs the session: its quota use is final."""
SETTLED: Final = frozenset({"verified", "refused"})
"""A new session may start after these (a refused pull still leaves remote checkpoints).
A failed session is pulled too: its entry point may have saved a checkpoint."""

_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "submitting": frozenset({"submitted", "running", *REMOTE_DONE}),
    "submitted": frozenset({"submitted", "running", *REMOTE_DONE}),
    "running": frozenset({"running", *REMOTE_DONE}),
    "completed": frozenset({"pulled", "refused"}),
    "interrupted": frozenset({"pulled", "refused"}),
    "stopped": frozenset({"pulled", "refused"}),
    "failed": frozenset({"pulled", "refused"}),
    "pulled": frozenset({"verified", "refused"}),
    "refused": frozenset({"pulled", "refused"}),
    "verified": frozenset(),
}


CRASH_ENV: Final = "UFF_PORT_CLOUD_CRASH_AT"


def crash_point(name: str) -> None:
    """Fault injection for recovery tests: die here, as SIGKILL would, when asked."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


class JournalError(Exception):
    """A transition the journal refuses (a logic error, never a provider error)."""


@dataclass
class Session:
    index: int
    backend: str
    name: str
    state: str = "submitting"
    remote_ref: str | None = None
    created_ts: float = 0.0
    started_ts: float | None = None
    ended_ts: float | None = None
    billed_seconds: float | None = None
    remote_state: str | None = None
    detail: str | None = None
    step: int | None = None
    pulled_to: str | None = None
    budget_seconds: float = 0.0
    pull_attempts: int = 0
    finished: bool = False
    history: list[list[Any]] = field(default_factory=list)


@dataclass
class JournalData:
    run_id: str
    strategy: str
    sessions: list[Session] = field(default_factory=list)
    finished: bool = False
    final_step: int | None = None
    stop_requested: bool = False


class Journal:
    """The journal file of one run directory (`<run>/cloud/journal.json`)."""

    def __init__(self, run_dir: str | Path, data: JournalData) -> None:
        self.path = Path(run_dir) / JOURNAL_NAME
        self.data = data

    @classmethod
    def open(cls, run_dir: str | Path, run_id: str, strategy: str) -> Journal:
        """Load the journal, or start an empty one (not yet written)."""
        path = Path(run_dir) / JOURNAL_NAME
        if path.exists():
            return cls(run_dir, cls._parse(json.loads(path.read_text(encoding="utf-8"))))
        return cls(run_dir, JournalData(run_id=run_id, strategy=strategy))

    @classmethod
    def load(cls, run_dir: str | Path) -> Journal | None:
        path = Path(run_dir) / JOURNAL_NAME
        if not path.exists():
            return None
        return cls(run_dir, cls._parse(json.loads(path.read_text(encoding="utf-8"))))

    @staticmethod
    def _parse(raw: dict[str, Any]) -> JournalData:
        sessions = [Session(**s) for s in raw.get("sessions", [])]
        return JournalData(
            run_id=raw["run_id"],
            strategy=raw["strategy"],
            sessions=sessions,
            finished=bool(raw.get("finished", False)),
            final_step=raw.get("final_step"),
            stop_requested=bool(raw.get("stop_requested", False)),
        )

    def save(self) -> None:
        # Durable before the caller acts on it: atomic_write_json fsyncs the
        # file and its directory.
        atomic_write_json(self.path, asdict(self.data))
        cur = self.current
        crash_point(f"saved:{cur.state if cur else 'empty'}")

    @property
    def current(self) -> Session | None:
        return self.data.sessions[-1] if self.data.sessions else None

    def begin_session(self, backend: str, name: str, now: float | None = None, budget_seconds: float = 0.0) -> Session:
        """Record the intent to submit session `name` (saved before the submit call)."""
        cur = self.current
        if cur is not None and cur.state not in SETTLED:
            raise JournalError(f"session {cur.name} is still {cur.state}; settle it first")
        ts = time.time() if now is None else now
        session = Session(
            index=len(self.data.sessions), backend=backend, name=name, created_ts=ts, budget_seconds=budget_seconds
        )
        session.history.append(["submitting", ts])
        self.data.sessions.append(session)
        self.save()
        return session

    def transition(self, state: str, now: float | None = None, **fields: Any) -> Session:
        """Move the current session to `state` (and set fields), durably."""
        session = self.current
        if session is None:
            raise JournalError("no session to transition")
        if state not in _ALLOWED:
            raise JournalError(f"unknown state {state!r}")
        if state != session.state and state not in _ALLOWED[session.state]:
            raise JournalError(f"session {session.name}: {session.state} -> {state} is not allowed")
        ts = time.time() if now is None else now
        for key, value in fields.items():
            if not hasattr(session, key):
                raise JournalError(f"unknown session field {key!r}")
            setattr(session, key, value)
        if state != session.state:
            session.history.append([state, ts])
            session.state = state
        self.save()
        return session

    def mark_finished(self, step: int | None) -> None:
        self.data.finished = True
        self.data.final_step = step
        self.save()

    def summary(self) -> dict[str, Any]:
        cur = self.current
        return {
            "run_id": self.data.run_id,
            "strategy": self.data.strategy,
            "sessions": len(self.data.sessions),
            "finished": self.data.finished,
            "final_step": self.data.final_step,
            "current": None
            if cur is None
            else {
                "index": cur.index,
                "backend": cur.backend,
                "name": cur.name,
                "state": cur.state,
                "remote_state": cur.remote_state,
                "step": cur.step,
            },
        }
