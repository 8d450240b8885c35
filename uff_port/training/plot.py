"""Loss, learning-rate and throughput plot of a run, drawn from its events.jsonl (PNG, headless).

A resumed run repeats the steps after its checkpoint: the latest report of a
step wins, so the curve is the one the final weights went through; a dashed
vertical line marks each step a run resumed from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from uff_port.training.reporting import read_events


def _by_step(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The last `kind` event of each step, in step order."""
    last: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == kind and isinstance(e.get("step"), int) and isinstance(e.get("loss"), (int, float)):
            last[e["step"]] = e
    return [last[s] for s in sorted(last)]


def resume_steps(events: list[dict[str, Any]]) -> list[int]:
    """The steps the run resumed from (each `resumed from ... at step N` report), in order, once each."""
    steps = [e["resumed_from"] for e in events if e.get("event") == "log" and isinstance(e.get("resumed_from"), int)]
    return sorted(set(steps))


def plot_run(run_dir: Path, out: Path | None = None) -> Path | None:
    """Write RUN_DIR/training.png (replaced whole, never half-written); None when no progress yet."""
    events = read_events(run_dir)
    prog = _by_step(events, "progress")
    if not prog:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    from matplotlib.figure import Figure

    evals = _by_step(events, "eval")
    rollouts = [e for e in events if e.get("event") == "rollout" and isinstance(e.get("reward"), (int, float))]
    steps = [e["step"] for e in prog]
    fig = Figure(figsize=(8, 8 if rollouts else 6))  # not pyplot: no global state, safe off the main thread
    axes = fig.subplots(3 if rollouts else 2, 1, sharex=True)
    ax1, ax2 = axes[0], axes[-1]
    if rollouts:  # an RL run: the mean reward of each generation batch
        axes[1].plot([e["step"] for e in rollouts], [e["reward"] for e in rollouts], color="tab:orange",
                     label="mean reward")
        if any(e.get("pass_rate") is not None for e in rollouts):
            axes[1].plot([e["step"] for e in rollouts], [e.get("pass_rate") for e in rollouts], ":",
                         color="tab:red", label="tests pass rate")
        axes[1].set_ylabel("reward")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    ax1.plot(steps, [e["loss"] for e in prog], label="train loss")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
    ax1.set_ylabel("loss (nats/token)")
    ax1.grid(alpha=0.3)
    lines, labels = ax1.get_legend_handles_labels()
    lrs = [(e["step"], e["lr"]) for e in prog if isinstance(e.get("lr"), (int, float))]
    if lrs:
        ax_lr = ax1.twinx()
        ax_lr.plot([s for s, _ in lrs], [v for _, v in lrs], color="tab:gray", linestyle=":", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more, more_labels = ax_lr.get_legend_handles_labels()
        lines, labels = lines + more, labels + more_labels
    for i, step in enumerate(resume_steps(events)):
        for ax in axes:
            line = ax.axvline(step, color="tab:red", linestyle="--", alpha=0.6,
                              label="resumed" if i == 0 and ax is ax1 else None)
        if i == 0:
            lines, labels = lines + [line], labels + ["resumed"]
    ax1.legend(lines, labels, loc="upper right")
    ax2.plot(steps, [e.get("tokens_per_s") or 0 for e in prog], color="tab:green")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    target = Path(out or Path(run_dir) / "training.png")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, target)
    return target
