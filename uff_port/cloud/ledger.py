"""Quota ledger: GPU time per backend, from real session durations.

An append-only JSONL file shared by every run of a runs root. A session first
*reserves* its expected time (so two runs routing at once do not both spend
the last hours), then its real use replaces the reservation under the same
key. Lines are appended under an exclusive lock and fsynced: the ledger is
what keeps us inside the free quota, a lost line means overspending.

Windows: Kaggle's budget is per calendar week (from `week_starts`, 00:00 UTC),
SageMaker's per UTC day.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.cloud.settings import HOUR, BudgetSettings

BACKENDS: Final = ("kaggle", "sagemaker")
_WEEKDAY: Final = {"monday": 0, "saturday": 5, "sunday": 6}
DAY: Final = 86400.0


@dataclass(frozen=True)
class Usage:
    key: str
    backend: str
    start: float
    seconds: float
    final: bool


class QuotaLedger:
    """Budgets and usage of the cloud backends (local GPUs are not metered)."""

    def __init__(self, path: str | Path | None, budgets: BudgetSettings | None = None) -> None:
        """`path=None` keeps records in memory (plans and simulations)."""
        self.path = None if path is None else Path(path)
        self.budgets = budgets or BudgetSettings.model_validate({})
        self._memory: list[str] = []

    # ---- windows -------------------------------------------------------------
    def window(self, backend: str, now: float) -> tuple[float, float]:
        """[start, end) of the budget window holding `now`."""
        day = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        if backend == "sagemaker":
            start = day
            return start.timestamp(), start.timestamp() + DAY
        if backend == "kaggle":
            back = (day.weekday() - _WEEKDAY[self.budgets.week_starts]) % 7
            start = day - dt.timedelta(days=back)
            return start.timestamp(), start.timestamp() + 7 * DAY
        raise ValueError(f"unknown backend {backend!r}")

    def budget_seconds(self, backend: str) -> float:
        if backend == "kaggle":
            return self.budgets.kaggle_hours_per_week * HOUR
        if backend == "sagemaker":
            return self.budgets.sagemaker_hours_per_day * HOUR
        raise ValueError(f"unknown backend {backend!r}")

    # ---- records -------------------------------------------------------------
    def _append(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, sort_keys=True)
        if self.path is None:
            self._memory.append(text)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (text + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            # The ledger is what keeps spending inside the free quota: durable now.
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def routing_lock(self) -> Iterator[None]:
        """Held while a run checks the ledger and reserves: two runs routing at once would
        otherwise both see a backend free and both take it (a lock file of its own, since
        `_append` locks the ledger itself)."""
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def reserve(self, key: str, backend: str, start: float, seconds: float) -> None:
        """Hold `seconds` of `backend` for a session about to start."""
        self._append({"kind": "reserve", "key": key, "backend": backend, "start": start, "seconds": seconds})

    def record(self, key: str, backend: str, start: float, seconds: float) -> None:
        """The real use of a finished session; replaces its reservation (idempotent by key)."""
        if any(u.key == key and u.final for u in self.usages()):
            return
        self._append({"kind": "use", "key": key, "backend": backend, "start": start, "seconds": max(0.0, seconds)})

    def release(self, key: str) -> None:
        """Drop a reservation whose session never ran."""
        self._append({"kind": "release", "key": key})

    def usages(self) -> list[Usage]:
        """Effective usage per key: the real use if known, else the open reservation."""
        if self.path is None:
            lines = self._memory
        elif self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
        else:
            return []
        by_key: dict[str, Usage] = {}
        released: set[str] = set()
        for raw in lines:
            try:
                rec = json.loads(raw)
                kind, key = rec["kind"], rec["key"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: skip it, never fail routing
            if kind == "release":
                released.add(key)
                continue
            try:
                usage = Usage(key, str(rec["backend"]), float(rec["start"]), float(rec["seconds"]), kind == "use")
            except (KeyError, TypeError, ValueError):
                continue
            prev = by_key.get(key)
            if prev is None or usage.final or not prev.final:
                by_key[key] = usage
        return [u for k, u in by_key.items() if u.final or k not in released]

    # ---- queries -------------------------------------------------------------
    def used_seconds(self, backend: str, now: float) -> float:
        lo, hi = self.window(backend, now)
        total = 0.0
        for u in self.usages():
            if u.backend != backend:
                continue
            # Attribute the overlap with this window (a session may span midnight).
            total += max(0.0, min(u.start + u.seconds, hi) - max(u.start, lo))
        return total

    def remaining_seconds(self, backend: str, now: float) -> float:
        return max(0.0, self.budget_seconds(backend) - self.used_seconds(backend, now))

    def in_flight(self, backend: str, now: float, *, other_than: str = "") -> list[float]:
        """End times of the sessions on `backend` running at `now` whose key does not start with
        `other_than` (a run's own sessions): open reservations, which a session holds until its
        real use replaces them."""
        return sorted(
            u.start + u.seconds
            for u in self.usages()
            if u.backend == backend and not u.final and u.start <= now < u.start + u.seconds
            and not (other_than and u.key.startswith(other_than))
        )

    def next_reset(self, backend: str, now: float) -> float:
        return self.window(backend, now)[1]

    def budget_view(self, now: float) -> dict[str, dict[str, float]]:
        """Per backend: budget, used and remaining hours in the current window."""
        return {
            b: {
                "budget_hours": self.budget_seconds(b) / HOUR,
                "used_hours": round(self.used_seconds(b, now) / HOUR, 4),
                "remaining_hours": round(self.remaining_seconds(b, now) / HOUR, 4),
                "resets_at": self.next_reset(b, now),
            }
            for b in BACKENDS
        }
