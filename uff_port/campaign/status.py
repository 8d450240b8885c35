"""The campaign as a table (rich) and as a Gantt chart of the week (matplotlib)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Final

from uff_port.campaign.journal import CampaignView

BUDGET_KEYS: Final = {"kaggle": "kaggle_hours_per_week", "sagemaker": "sagemaker_hours_per_day"}
_COLOURS: Final = {"local": "tab:green", "kaggle": "tab:blue", "sagemaker": "tab:orange", "hybrid": "tab:purple"}


def billed_hours(campaign_dir: Path, view: CampaignView) -> dict[str, float]:
    """Hours the providers billed per cloud backend, from each job's cloud journal.

    The journal's training phases give a job's wall time on the backend it
    was placed on; a `hybrid` job's sessions go to either cloud, so only the
    sessions themselves say where its hours were spent.
    """
    from uff_port.cloud.journal import Journal
    from uff_port.fsutil import confine

    out: dict[str, float] = {}
    for name in view.jobs:
        for run in (name, f"{name}-rl"):
            try:
                journal = Journal.load(confine(campaign_dir, run))
            except (ValueError, OSError, KeyError, TypeError):
                continue  # outside the campaign, unreadable or not a cloud journal: nothing billed here
            for s in journal.data.sessions if journal is not None else []:
                seconds = s.billed_seconds
                if seconds is None and s.started_ts is not None and s.ended_ts is not None:
                    seconds = s.ended_ts - s.started_ts
                out[s.backend] = out.get(s.backend, 0.0) + max(0.0, seconds or 0.0) / 3600.0
    return out


def _scores(scores: dict[str, object]) -> str:
    parts = []
    for suite, value in sorted(scores.items()):
        if isinstance(value, dict):
            parts += [f"{suite} {k} {v:.3g}" if isinstance(v, float) else f"{suite} {k} {v}"
                      for k, v in sorted(value.items())]
        else:
            parts.append(f"{suite} {value}")
    return ", ".join(parts) or "-"


def render_table(view: CampaignView, now: float, billed: dict[str, float] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"campaign {view.name or '?'}: {view.state}"
                  + (f" (started {view.starts} times)" if view.starts > 1 else ""))
    for col in ("job", "role", "backend", "state", "step", "eval", "verdict", "reason"):
        table.add_column(col)
    for j in view.jobs.values():
        steps = f"{j.step if j.step is not None else '-'}/{j.max_steps if j.max_steps is not None else '?'}"
        table.add_row(j.name, j.role, j.backend or "-", j.state, steps, _scores(j.scores),
                      j.verdict or "-", (j.reason or "")[:80])
    console = Console()
    console.print(table)
    used = view.hours_used(now)
    billed = billed or {}
    budget = Table(title="GPU-hours")
    for col in ("backend", "training", "billed", "budget"):
        budget.add_column(col)
    local = view.budgets.get("local_gpus")
    for backend in sorted(set(used) | set(billed) | {"kaggle", "sagemaker"}):
        key = BUDGET_KEYS.get(backend)
        limit = (f"{view.budgets[key]:g} h" + ("/week" if backend == "kaggle" else "/day")) if key and key in view.budgets \
            else (f"{local:g} GPU" if backend == "local" and local is not None else "-")
        paid = f"{billed.get(backend, 0.0):.3f} h" if backend in BUDGET_KEYS else "-"
        budget.add_row(backend, f"{used.get(backend, 0.0):.3f} h", paid, limit)
    console.print(budget)
    if view.release:
        console.print(f"release: {view.release.get('name')} ({', '.join(view.release.get('roles') or [])})")


def write_gantt(view: CampaignView, out: Path, now: float) -> Path:
    """Jobs over time, one row per job, coloured by backend (a failed or refused job hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    jobs = list(view.jobs.values())
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.45 * max(1, len(jobs))))
    for row, j in enumerate(jobs):
        for start, end in j.intervals:
            stop = end if end is not None else now
            ax.barh(row, max(stop - start, 1.0) / 3600.0,
                    left=(start - (view.started_at or start)) / 3600.0,
                    color=_COLOURS.get(j.backend, "tab:gray"),
                    hatch="//" if j.state in ("failed", "refused", "skipped") else None, edgecolor="black")
    ax.set_yticks(range(len(jobs)), [f"{j.name} ({j.state})" for j in jobs])
    ax.invert_yaxis()
    since = dt.datetime.fromtimestamp(view.started_at or now, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ax.set_xlabel(f"hours since {since}")
    ax.set_title(f"campaign {view.name}")
    ax.legend(handles=[Patch(color=c, label=b) for b, c in _COLOURS.items()], loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
