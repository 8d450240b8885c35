"""Where the numbers of a run go besides events.jsonl: metrics.csv, TensorBoard, training.png.

A listener on the trainer's Reporter (rank 0 only), so every run gets them
whatever started it: the CLI, the worker, Elixir or a cloud session. A resumed
run repeats the steps after its checkpoint: rows past the resume point are cut
from metrics.csv and TensorBoard purges them (`purge_step`), so no step appears
twice. The plot is redrawn in the background after each checkpoint and once
more when the trainer ends.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import UnsafePath, atomic_write_text, open_confined

METRICS_CSV: Final = "metrics.csv"
TENSORBOARD_DIR: Final = "tensorboard"
COLUMNS: Final = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "eval_loss")
_FLUSH_ON: Final = frozenset({"checkpoint", "finished", "failed"})
"""Events after which the row held for a possible eval of its step is written (besides `stopped`)."""


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class MetricsCsv:
    """RUN_DIR/metrics.csv, one row per reported step; an eval of that step joins its row."""

    def __init__(self, run_dir: Path, resumed_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_CSV
        self.pending: dict[str, Any] | None = None
        self._truncate_after(resumed_step)

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to the step resumed from: the steps after it are trained again."""
        try:
            with open_confined(self.run_dir, self.path, "r") as fh:
                rows = list(csv.DictReader(fh))
        except FileNotFoundError:
            rows = []
        kept = [r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buf.getvalue())

    def on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress" and isinstance(ev.get("step"), int):
            self.flush()
            self.pending = {k: ev.get(k) for k in COLUMNS}
        elif kind == "eval" and isinstance(ev.get("step"), int):
            if self.pending is None or self.pending["step"] != ev["step"]:
                self.flush()
                self.pending = {"step": ev["step"]}
            self.pending["eval_loss"] = ev.get("loss")
            self.flush()
        elif kind in _FLUSH_ON or (kind == "state" and ev.get("state") == "stopped"):
            self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        row, self.pending = self.pending, None
        line = ",".join(_cell(row.get(k)) for k in COLUMNS) + "\n"
        with open_confined(self.run_dir, self.path, "a") as fh:
            fh.write(line)


class TensorBoardSink:
    """Scalars under RUN_DIR/tensorboard (train/loss, train/lr, ..., eval/loss)."""

    def __init__(self, run_dir: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier attempt logged past the checkpoint.
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=resumed_step + 1 if resumed_step else None)

    def on_event(self, ev: dict[str, Any]) -> None:
        step = ev.get("step")
        if not isinstance(step, int):
            return
        if ev.get("event") == "progress":
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if isinstance(ev.get(key), (int, float)):
                    self.writer.add_scalar(f"train/{key}", ev[key], step)
        elif ev.get("event") == "eval" and isinstance(ev.get("loss"), (int, float)):
            self.writer.add_scalar("eval/loss", ev["loss"], step)
        elif ev.get("event") == "checkpoint":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Plotter:
    """training.png redrawn off the training thread; at most one drawing at a time."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None]) -> None:
        self.run_dir = Path(run_dir)
        self.warn = warn
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def draw(self) -> None:
        from uff_port.training.plot import plot_run

        with self.lock:
            try:
                plot_run(self.run_dir)
            except Exception as exc:  # noqa: BLE001 - a plot never fails a run
                self.warn(f"training.png: {type(exc).__name__}: {exc}")

    def draw_soon(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return  # the drawing under way reads the events as they are now
        self.thread = threading.Thread(target=self.draw, name="plot", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join()
        self.draw()


class RunSinks:
    """The sinks `output` asks for, fed by the Reporter; `close()` when the trainer ends."""

    def __init__(self, run_dir: Path, output: Any, *, resumed_step: int | None,
                 warn: Callable[[str], None]) -> None:
        start = resumed_step or 0
        self.warn = warn
        self._lock = threading.Lock()  # the checkpoint thread reports too
        self.settled = False
        self.csv: MetricsCsv | None = None
        self.tb: TensorBoardSink | None = None
        self.plotter = Plotter(run_dir, warn) if output.plot else None
        if output.metrics_csv:
            try:
                self.csv = MetricsCsv(run_dir, start)
            except (OSError, UnsafePath) as exc:
                warn(f"output.metrics_csv: {exc}; no metrics.csv for this run")
        if output.tensorboard:
            if tensorboard_available():
                self.tb = TensorBoardSink(run_dir, start)
            else:
                warn("output.tensorboard: the tensorboard package is not installed "
                     "(pip install 'uff-port[tensorboard]'); no TensorBoard logs for this run")

    def __call__(self, ev: dict[str, Any]) -> None:
        problem = None
        with self._lock:
            try:
                if self.csv is not None:
                    self.csv.on_event(ev)
                if self.tb is not None:
                    self.tb.on_event(ev)
            except (OSError, UnsafePath) as exc:  # a full disk or a planted link: the run goes on
                self.csv = None
                problem = f"metrics: {exc}; metrics logging stopped"
        if problem:
            self.warn(problem)
        if self.plotter is not None and ev.get("event") == "checkpoint":
            self.plotter.draw_soon()

    def settle(self) -> None:
        """Everything on disk now: called before `finished`, so whoever hears it finds the files."""
        with self._lock:
            if self.csv is not None:
                try:
                    self.csv.flush()
                except (OSError, UnsafePath):
                    pass
            if self.tb is not None:
                self.tb.writer.flush()
        if self.plotter is not None:
            self.plotter.close()
        self.settled = True

    def close(self) -> None:
        """At the trainer's end, whichever way it ends (a stop, a failure): the plot as it stands."""
        if not self.settled:
            self.settle()
        if self.tb is not None:
            self.tb.close()
