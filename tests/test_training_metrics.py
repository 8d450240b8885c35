"""metrics.csv, TensorBoard and training.png, written by the trainer itself for every run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.client import WorkerClient
from uff_port.core.config import validate_config
from uff_port.training import metrics
from uff_port.training.metrics import COLUMNS, MetricsCsv, RunSinks
from uff_port.training.plot import plot_run, resume_steps

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMALL = ["--set", "data.seq_len=128", "--set", "training.progress_every_seconds=0", "--set", "checkpoint.every_steps=4",
         "--set", "eval.every_steps=4", "--set", "eval.max_batches=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("UFF_PORT_CACHE", str(tmp_path_factory.getbasetemp() / "uff-cache"))
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT)
    return e


def trainer(run_dir: Path, env: dict[str, str], *args: str) -> None:
    proc = subprocess.run([PY, "-m", "uff_port.training", "--run-dir", str(run_dir), "--config", "tiny", *SMALL, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_and_tensorboard_hold_each_step_once_across_a_resume(tmp_path: Path, env: dict[str, str]) -> None:
    run = tmp_path / "run"
    on = ["--set", "output.metrics_csv=true", "--set", "output.tensorboard=true"]
    trainer(run, env, "--set", "training.max_steps=8", *on)
    first = rows(run)
    assert [int(r["step"]) for r in first] == list(range(1, 9))
    assert [r["step"] for r in first if r["eval_loss"]] == ["4", "8"]  # the eval joins its step's row
    assert all(float(r["loss"]) > 0 and float(r["tokens_per_s"]) > 0 and r["lr"] and r["grad_norm"] for r in first)
    png_before = (run / "training.png").stat().st_mtime_ns
    # Resume from step 4 (steps 5-8 are trained again) and go on to 12.
    trainer(run, env, "--set", "training.max_steps=12", *on, "--resume-from", str(run / "checkpoints" / "step-00000004"))
    after = rows(run)
    assert [int(r["step"]) for r in after] == list(range(1, 13))  # no step twice
    assert after[:4] == first[:4]  # what came before the checkpoint is kept as it was
    assert [r["step"] for r in after if r["eval_loss"]] == ["4", "8", "12"]
    assert list(after[0]) == list(COLUMNS)
    # TensorBoard: the earlier attempt's steps 5-8 are purged, each step read back once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("eval/loss")] == [4, 8, 12]
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert all(abs(losses[int(r["step"])] - float(r["loss"])) < 1e-4 for r in after)
    # The trainer redrew the plot, with the resume marked.
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert resume_steps(events) == [4]
    assert (run / "training.png").stat().st_mtime_ns > png_before


@pytest.mark.slow
def test_a_run_started_through_the_worker_gets_its_plot(worker: WorkerClient, runs_root: Path) -> None:
    worker.request("train", {"config_path": "tiny", "run_dir": "w", "overrides": {
        "training.max_steps": 4, "data.seq_len": 128, "checkpoint.every_steps": 2, "eval.every_steps": 2,
        "training.progress_every_seconds": 0, "output.metrics_csv": True}})  # a row for every step
    worker.wait_event(lambda e: e.get("event") in ("finished", "failed"), 240)
    assert worker.events_named("finished"), worker.events_named("failed")
    assert (runs_root / "w" / "training.png").stat().st_size > 1000
    assert [int(r["step"]) for r in rows(runs_root / "w")] == [1, 2, 3, 4]


def _output(**kw: Any) -> Any:
    return validate_config({"model": {"name_or_path": "builtin:tiny-llama"}, "output": kw}).output


def test_tensorboard_without_the_package_is_a_warning_not_a_failure(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "tensorboard_available", lambda: False)
    warnings: list[str] = []
    sinks = RunSinks(tmp_path, _output(tensorboard=True, plot=False), resumed_step=None, warn=warnings.append)
    assert sinks.tb is None and len(warnings) == 1 and "pip install 'uff-port[tensorboard]'" in warnings[0]
    sinks({"event": "progress", "step": 1, "loss": 1.0})
    sinks.close()
    assert not (tmp_path / "tensorboard").exists()


def test_a_csv_planted_as_a_symlink_is_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("step\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").symlink_to(outside)
    warnings: list[str] = []
    sinks = RunSinks(run, _output(metrics_csv=True, plot=False), resumed_step=None, warn=warnings.append)
    sinks({"event": "progress", "step": 1, "loss": 1.0})
    sinks({"event": "progress", "step": 2, "loss": 1.0})
    sinks.close()
    assert outside.read_text() == "step\n" and warnings


def test_the_plot_shows_the_last_attempt_of_each_step(tmp_path: Path) -> None:
    evs = [{"event": "progress", "step": s, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10} for s in (1, 2, 3, 4)]
    evs += [{"event": "log", "message": "resumed", "resumed_from": 2}]
    evs += [{"event": "progress", "step": s, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10} for s in (3, 4)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    assert resume_steps(evs) == [2]
    out = plot_run(tmp_path)
    assert out is not None and out.stat().st_size > 1000
    assert not list(tmp_path.glob(".training.png*"))  # written whole, by one rename


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.booleans()), max_size=40), st.integers(0, 30))
def test_csv_rows_are_unique_and_ordered_after_any_resume(tmp_path_factory: pytest.TempPathFactory,
                                                          reports: list[tuple[int, bool]], resume: int) -> None:
    """A first attempt reports any steps; a resume from `resume` then reports the steps after it."""
    run = tmp_path_factory.mktemp("csv")
    sink = MetricsCsv(run, 0)
    step = 0
    for advance, with_eval in reports:
        step += advance
        sink.on_event({"event": "progress", "step": step, "loss": 1.5})
        if with_eval:
            sink.on_event({"event": "eval", "step": step, "loss": 1.25})
    sink.flush()
    again = MetricsCsv(run, resume)
    for s in range(resume + 1, resume + 4):
        again.on_event({"event": "progress", "step": s, "loss": 0.5})
    again.flush()
    steps = [int(r["step"]) for r in rows(run)]
    assert steps == sorted(set(steps))
    assert steps[-3:] == [resume + 1, resume + 2, resume + 3]
