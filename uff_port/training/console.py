"""What `uff-port train | resume` shows: a config line, a progress bar, and a summary.

The trainer's own stdout and stderr (library warnings, tracebacks) go to
RUN_DIR/trainer.log, never into the bar; the terminal shows only what the
trainer reports as events, with numbers rounded (losses to 4 significant
digits), and each error once, in the summary. Nothing heavy is imported here.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import IO, Any, Final

from uff_port.core import layout
from uff_port.core.exits import ExitCode

LOG_TAIL_LINES: Final = 15
_LINE_EVENTS: Final = ("eval", "checkpoint", "log", "cloud_submitted", "cloud_status", "quota")


def num(value: Any, digits: int = 4) -> str:
    """A float to `digits` significant digits; anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{sec}s")


def mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def config_line(cfg: Any, run_dir: Path) -> str:
    """The run in one line: model, adapter, batch, schedule, device, where it goes."""
    t, d = cfg.training, cfg.data
    adapter = f"LoRA r{cfg.lora.r}" if cfg.lora.enabled else "no LoRA"
    if cfg.quantization.mode != "none":
        adapter = "Q" + adapter + f" ({cfg.quantization.mode})"
    steps = getattr(t, "max_steps", None)
    epochs = getattr(t, "num_epochs", None)
    length = f"{steps:,} steps" if steps else f"{epochs} epochs"
    procs = cfg.distributed.nproc * cfg.distributed.nnodes
    batch = f"{t.micro_batch_size}x{t.grad_accum_steps} seqs of {d.seq_len} tokens"
    parts = [
        f"{cfg.model.name_or_path}",
        adapter,
        f"{length} of {batch}",
        f"lr {num(t.learning_rate, 3)} {t.lr_scheduler}" + (f", warm-up {t.warmup_steps}" if t.warmup_steps else ""),
        f"{t.device} {t.precision}" + (f" x{procs} processes" if procs > 1 else ""),
    ]
    if cfg.checkpoint.every_steps:
        parts.append(f"checkpoint every {cfg.checkpoint.every_steps} steps")
    return f"{cfg.name or 'run'}: " + " · ".join(parts) + f"  ->  {run_dir}"


def open_log(run_dir: Path) -> IO[bytes]:
    """RUN_DIR/trainer.log for appending (never through a symlink out of the run)."""
    from uff_port.fsutil import open_confined

    return open_confined(run_dir, run_dir / layout.TRAINER_LOG, "ab")


class Display:
    """Feeds on trainer events: a rich progress bar (unless quiet) and what the summary needs."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.started = time.monotonic()
        self.finished: dict[str, Any] | None = None
        self.failed: dict[str, Any] | None = None
        self.stopped = False
        self.step: int | None = None
        self.max_steps: int | None = None
        self.peak: tuple[int, str] | None = None
        self.progress: Any = None
        if not quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description:<10}"),
                BarColumn(bar_width=12),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("remaining"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("loading", total=None, info="")
            self.progress.start()

    def _bar(self, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, **fields)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress":
            self.step, self.max_steps = ev.get("step"), ev.get("max_steps")
            info = f"loss {num(ev.get('loss'))} {int(ev.get('tokens_per_s') or 0):,} tok/s"
            self._bar(description="training", completed=ev["step"], total=ev["max_steps"], info=info)
        elif kind == "state":
            if ev.get("state") == "stopped":
                self.stopped = True
            self._bar(description=str(ev.get("state")))
        elif kind == "finished":
            self.finished = ev
            self.step = ev.get("step", self.step)
            self._bar(description="done", completed=ev.get("step") or 0, total=ev.get("max_steps") or ev.get("step"))
        elif kind == "failed":
            self.failed = ev  # printed once, in the summary
            self._bar(description="failed")
        elif kind == "log" and isinstance(ev.get("peak_memory_bytes"), int):
            self.peak = (ev["peak_memory_bytes"], str(ev.get("peak_memory_of") or ""))
        elif kind == "cloud_verified" and isinstance(ev.get("step"), int):
            self._bar(description="cloud", completed=ev["step"])
            self.print(line(ev))
        elif kind in _LINE_EVENTS:
            self.print(line(ev))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def line(ev: dict[str, Any]) -> str:
    kind = ev.get("event")
    if kind == "eval":
        return f"eval        step {ev.get('step')}: loss {num(ev.get('loss'))}, perplexity {num(ev.get('perplexity'))}"
    if kind == "checkpoint":
        return f"checkpoint  step {ev.get('step')} -> {ev.get('path')} ({num(ev.get('seconds'), 2)} s)"
    if kind and kind.startswith("cloud_") or kind == "quota":
        fields = {k: v for k, v in ev.items() if k not in ("event", "ts", "budgets") and v is not None}
        return f"{kind} " + " ".join(f"{k}={num(v)}" for k, v in fields.items())
    return f"{ev.get('level', 'info')}: {ev.get('message')}"


def _best_eval(run_dir: Path) -> tuple[float, Any] | None:
    from uff_port.training.reporting import read_events

    evals = [(e["loss"], e.get("step")) for e in read_events(run_dir)
             if e.get("event") == "eval" and isinstance(e.get("loss"), (int, float))]
    return min(evals, key=lambda x: x[0]) if evals else None


def _log_tail(run_dir: Path) -> list[str]:
    try:
        text = (run_dir / layout.TRAINER_LOG).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return text.rstrip().splitlines()[-LOG_TAIL_LINES:]


def next_steps(run_dir: Path) -> list[str]:
    r = shlex.quote(str(run_dir))
    merged = shlex.quote(f"{run_dir}-merged")
    return [
        f"uff-port generate {r} --prompt 'def fib(n):'",
        f"uff-port chat {r}",
        f"uff-port merge {r} --out {merged}",
        f"uff-port eval {r} --suite humaneval --limit 20",
        f"uff-port register {r} --role textgen --version 0.1.0",
    ]


def summary(display: Display, run_dir: Path, code: int, *, artifact: str | None, plot: Path | None) -> None:
    """The end of the run in a few lines; the error (if any) exactly once."""
    out = display.console
    say = lambda text="": out.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    wall = duration(time.monotonic() - display.started)
    fin, fail = display.finished, display.failed
    if code == ExitCode.OK and fin is not None:
        tokens = fin.get("tokens_seen")
        facts = [f"{fin.get('step')} steps in {wall}"]
        if isinstance(tokens, int):
            facts.append(f"{tokens:,} tokens seen")
        if fin.get("loss") is not None:
            facts.append(f"final loss {num(fin.get('loss'))}")
        best = _best_eval(run_dir)
        if best:
            facts.append(f"best eval loss {num(best[0])} (step {best[1]})")
        if display.peak:
            facts.append(f"peak {display.peak[1]} {mib(display.peak[0])}".replace("  ", " "))
        say()
        say("done: " + " · ".join(facts))
        if fin.get("final"):
            say(f"adapter:  {fin.get('final')}" + (f"  (artifact {artifact[:12]})" if artifact else ""))
        say(f"files:    {run_dir / layout.EVENTS}, {run_dir / layout.TRAINER_LOG}"
            + (f", {plot}" if plot else ""))
        say("next:")
        for cmd in next_steps(run_dir):
            say(f"  {cmd}")
        return
    say()
    if fail is not None:
        print(f"failed ({fail.get('code')}): {fail.get('message')}", file=sys.stderr)
        if fail.get("resumable"):
            say(f"resumable: uff-port resume {shlex.quote(str(run_dir))}")
    elif code == ExitCode.RESUMABLE or display.stopped:
        say(f"stopped at step {display.step} after {wall}, with a checkpoint; "
            f"continue with: uff-port resume {shlex.quote(str(run_dir))}")
    else:
        print(f"trainer exited with status {code} without saying why; the end of "
              f"{run_dir / layout.TRAINER_LOG}:", file=sys.stderr)
        for text in _log_tail(run_dir):
            print(f"  {text}", file=sys.stderr)
    say(f"run dir:  {run_dir}  (log: {run_dir / layout.TRAINER_LOG})")
