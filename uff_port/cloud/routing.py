"""Where the next session runs, and how a week of jobs spreads over the budget.

Routing never fails for lack of quota: a job that cannot fit now gets a
`wait_until` (the next budget reset) and waits, as the users asked; only a
misconfiguration is an error.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Final

from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.settings import HOUR, CloudSettings, backend_settings, session_budget_seconds

CLOUD_BACKENDS: Final = ("kaggle", "sagemaker")


@dataclass(frozen=True)
class Route:
    backend: str | None
    """`local`, `kaggle`, `sagemaker`, or None (wait)."""
    session_seconds: float
    wait_until: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _feasible(ledger: QuotaLedger, settings: CloudSettings, backend: str, now: float, need: float | None) -> float:
    """Seconds a session on `backend` could run now (0 if below the minimum session)."""
    length = min(session_budget_seconds(settings, backend), ledger.remaining_seconds(backend, now))
    if need is not None:
        length = min(length, need + settings.safety_margin_seconds)
    minimum = settings.budgets.min_session_minutes * 60.0
    if need is not None:
        minimum = min(minimum, need + settings.safety_margin_seconds)
    return length if length >= minimum and length > settings.safety_margin_seconds else 0.0


def choose_backend(
    strategy: str,
    ledger: QuotaLedger,
    settings: CloudSettings,
    now: float,
    *,
    gpu_present: bool = False,
    need_seconds: float | None = None,
    run_key: str | None = None,
) -> Route:
    """Pick the backend for the next session of a job with `need_seconds` left.

    With `run_key` (the prefix of the run's own ledger keys), a backend whose
    `max_concurrent_sessions` are taken by other runs' sessions is busy: the
    route waits for the first of them to end (or for a budget reset), so
    parallel runs of one ledger (a campaign's jobs) share the backends one
    session at a time, as the week's plan assumes.
    """
    if strategy == "local" or (strategy == "hybrid" and gpu_present):
        return Route("local", 0.0, None, "a local GPU is present" if strategy == "hybrid" else "strategy local")
    if strategy in CLOUD_BACKENDS:
        candidates: tuple[str, ...] = (strategy,)
    elif strategy == "hybrid":
        candidates = CLOUD_BACKENDS
    else:
        raise ValueError(f"strategy: expected local, kaggle, sagemaker or hybrid, got {strategy!r}")
    # Use-it-or-lose-it: among backends with a worthwhile session, take the one
    # whose budget resets soonest (SageMaker's daily hours vanish at midnight,
    # Kaggle's weekly ones keep); ties go to the longer session.
    best: tuple[float, float, str] | None = None
    frees: dict[str, float] = {}  # busy backend -> when its first other session ends
    for backend in candidates:
        others = ledger.in_flight(backend, now, other_than=run_key) if run_key is not None else []
        if len(others) >= backend_settings(settings, backend).max_concurrent_sessions:
            frees[backend] = others[0]
            continue
        length = _feasible(ledger, settings, backend, now, need_seconds)
        key = (ledger.next_reset(backend, now), -length)
        if length > 0 and (best is None or key < best[:2]):
            best = (key[0], key[1], backend)
    if best is not None:
        name = best[2]
        return Route(name, -best[1], None, f"{name} has {ledger.remaining_seconds(name, now) / HOUR:.2f} h left")
    wait = min(frees.get(b, ledger.next_reset(b, now)) for b in candidates)
    why = [f"{b} busy with another run's session" if b in frees else f"no budget left on {b}" for b in candidates]
    return Route(None, 0.0, wait, "; ".join(why) + "; waiting")


@dataclass(frozen=True)
class PlanEntry:
    job: str
    backend: str
    start: float
    hours: float


@dataclass
class WeekPlan:
    entries: list[PlanEntry]
    unscheduled: dict[str, float]
    """Job -> hours that did not fit into the week."""

    def render(self) -> str:
        lines = [f"{'job':<8} {'backend':<10} {'start (UTC)':<17} {'hours':>6}"]
        for e in self.entries:
            when = dt.datetime.fromtimestamp(e.start, tz=dt.timezone.utc).strftime("%a %m-%d %H:%M")
            lines.append(f"{e.job:<8} {e.backend:<10} {when:<17} {e.hours:>6.2f}")
        totals: dict[str, float] = {}
        for e in self.entries:
            totals[e.backend] = totals.get(e.backend, 0.0) + e.hours
        lines.append("totals: " + ", ".join(f"{b} {h:.1f} h" for b, h in sorted(totals.items())))
        if self.unscheduled:
            lines.append(
                "does not fit this week: " + ", ".join(f"{j} {h:.1f} h" for j, h in self.unscheduled.items())
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [asdict(e) for e in self.entries], "unscheduled": self.unscheduled}


def plan_week(
    jobs: list[tuple[str, float]],
    settings: CloudSettings,
    start: float,
    *,
    strategy: str = "hybrid",
    ledger: QuotaLedger | None = None,
    horizon_days: float = 7.0,
) -> WeekPlan:
    """Spread `jobs` (name, GPU-hours) over the budgets, in order.

    One session per backend at a time, and a job's sessions one after another
    (each resumes from the previous one's checkpoint).

    Uses an in-memory copy of the ledger's budgets so planning never spends
    quota. Each session also pays `safety_margin_seconds` of start/stop cost.
    """
    mem = QuotaLedger(None, settings.budgets)
    if ledger is not None:
        for u in ledger.usages():
            mem.record(u.key, u.backend, u.start, u.seconds)
    backends = CLOUD_BACKENDS if strategy == "hybrid" else (strategy,)
    free_at = {b: start for b in backends}
    end = start + horizon_days * 86400.0
    entries: list[PlanEntry] = []
    unscheduled: dict[str, float] = {}
    margin = settings.safety_margin_seconds
    n = 0
    for name, hours in jobs:
        left = hours * HOUR
        ready = start  # a job's sessions chain: the next starts after the last ends
        while left > 1.0:
            best: tuple[float, float, str] | None = None  # (start, length, backend)
            for b in backends:
                t = max(free_at[b], ready)
                while t < end:
                    length = _feasible(mem, settings, b, t, left)
                    if length > 0:
                        break
                    t = mem.next_reset(b, t)
                if t < end and (best is None or t < best[0]):
                    best = (t, _feasible(mem, settings, b, t, left), b)
            if best is None:
                unscheduled[name] = round(left / HOUR, 3)
                break
            t, length, b = best
            length = min(length, end - t)
            n += 1
            mem.record(f"plan-{n}", b, t, length)
            entries.append(PlanEntry(name, b, t, round(length / HOUR, 3)))
            left -= max(0.0, length - margin)
            free_at[b] = ready = t + length
    return WeekPlan(entries, unscheduled)
