"""Loss and throughput plot of a run, drawn from its events.jsonl (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

from uff_port.training.reporting import read_events


def plot_run(run_dir: Path, out: Path | None = None) -> Path | None:
    """Write RUN_DIR/training.png; None when the run has no progress yet."""
    events = read_events(run_dir)
    prog = [e for e in events if e.get("event") == "progress" and e.get("loss") is not None]
    if not prog:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    evals = [e for e in events if e.get("event") == "eval" and e.get("loss") is not None]
    rollouts = [e for e in events if e.get("event") == "rollout" and e.get("reward") is not None]
    fig, axes = plt.subplots(3 if rollouts else 2, 1, figsize=(8, 8 if rollouts else 6), sharex=True)
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
    ax1.plot([e["step"] for e in prog], [e["loss"] for e in prog], label="train loss")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot([e["step"] for e in prog], [e.get("tokens_per_s") or 0 for e in prog], color="tab:green")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    target = out or Path(run_dir) / "training.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
