#!/usr/bin/env python
"""The tiny job through a compressed week of the users' cloud budget.

    .venv/bin/python scripts/simulate_week.py [--scale 4] [--max-steps 240] [--seed 7]

One simulated hour lasts `--scale` real seconds. The run is routed `hybrid`
over Kaggle (30 h/week, 9 h sessions cut off by their budget) and SageMaker
(4 h/day; random stop_training_job = SIGTERM, then the kill after the
grace), while a random SIGKILL hits the running trainer every few simulated
hours. Everything is real except the providers: the generated kernel script
and the SageMaker entry point run as processes, the trainer trains, pulls
are verified. Reports goodput = steps kept / steps computed, GPU-hours per
backend, and the same job run once locally without interruption (the
baseline, measured in the same invocation).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import psutil
import yaml

from uff_port.cloud.backends.base import Backend
from uff_port.cloud.backends.kaggle import KaggleBackend
from uff_port.cloud.backends.sagemaker import SageMakerBackend
from uff_port.cloud.fakes import FakeKaggleApi, FakeS3, FakeSageMakerClient
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.cloud.timescale import ScaledBackend
from uff_port.core.config import validate_config

HOUR = 3600.0
WEEK_START = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc).timestamp()  # a Monday
SM = {"bucket": "sim", "role_arn": "arn:aws:iam::000000000000:role/sim", "image_uri": "sim:1", "max_runtime_seconds": 4 * 3600}


def tiny(max_steps: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
        "data": {"path": "builtin:sample-corpus", "seq_len": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": max_steps, "micro_batch_size": 2, "warmup_steps": 2, "device": "cpu",
                     "precision": "fp32", "progress_every_seconds": 0, "learning_rate": 0.003},
        # One step is 5-15 simulated minutes here: checkpointing every step keeps
        # the work lost to a SIGKILL near what a 10-minute interval loses to a
        # kill every 3 hours in real use.
        "checkpoint": {"every_steps": 1, "keep_last": 2},
        "eval": {"every_steps": None, "max_batches": 1},
        "output": {"plot": False},
    }


class SimClock:
    """Simulated time runs 3600/scale times faster than real time; waits for a budget reset jump."""

    def __init__(self, scale: float) -> None:
        self.factor = HOUR / scale
        self.real0 = time.time()
        self.offset = 0.0

    def __call__(self) -> float:
        return WEEK_START + (time.time() - self.real0) * self.factor + self.offset

    def sleep(self, sim_seconds: float) -> None:
        if sim_seconds > 1800:
            self.offset += sim_seconds  # nothing runs while waiting for quota: skip ahead
        else:
            time.sleep(max(0.02, sim_seconds / self.factor))


def trainers() -> list[psutil.Process]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "uff_port.training" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


def chaos(stop: threading.Event, rng: random.Random, clock: SimClock, every_hours: float, sm: FakeSageMakerClient,
          log: list[dict[str, Any]]) -> None:
    """A SIGKILL of a running trainer every few simulated hours; now and then SageMaker stops its job."""
    while not stop.wait(rng.expovariate(1.0 / every_hours) * HOUR / clock.factor):
        victims = trainers()
        if not victims:
            continue
        if rng.random() < 0.3 and (sm.root / "jobs").is_dir():
            running = [p.stem for p in (sm.root / "jobs").glob("*.json") if not (sm.root / "containers" / p.stem / "rc").exists()]
            if running:
                sm.stop_training_job(TrainingJobName=running[0])
                log.append({"sim_h": round((clock() - WEEK_START) / HOUR, 2), "what": "sagemaker stop (SIGTERM + grace)"})
                continue
        victim = rng.choice(victims)
        try:
            victim.kill()
            log.append({"sim_h": round((clock() - WEEK_START) / HOUR, 2), "what": "SIGKILL trainer"})
        except psutil.NoSuchProcess:
            pass


def count_progress(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                total += json.loads(line).get("event") == "progress"
            except ValueError:
                continue
    return total


def baseline(work: Path, cfg: dict[str, Any]) -> dict[str, float]:
    (work / "base.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "uff_port.training", "--run-dir", str(work / "base"), "--config", str(work / "base.yaml")],
                   check=True, capture_output=True)
    return {"wall_s": time.time() - t0, "steps_computed": count_progress([work / "base" / "events.jsonl"])}


def calibrate(work: Path, steps: int = 40) -> float:
    """Real seconds per training step on this machine, now (sizes the job to the week)."""
    (work / "cal.yaml").write_text(yaml.safe_dump(tiny(steps)))
    subprocess.run([sys.executable, "-m", "uff_port.training", "--run-dir", str(work / "cal"), "--config", str(work / "cal.yaml")],
                   check=True, capture_output=True)
    ts = [json.loads(line)["ts"] for line in (work / "cal" / "events.jsonl").read_text().splitlines()
          if json.loads(line).get("event") == "progress"]
    return max(1e-3, (ts[-1] - ts[0]) / max(1, len(ts) - 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=8.0, help="real seconds per simulated hour")
    ap.add_argument("--target-hours", type=float, default=30.0, help="size the job to this many simulated GPU-hours")
    ap.add_argument("--max-steps", type=int, default=None, help="default: sized by --target-hours")
    ap.add_argument("--kill-every-hours", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uff-week-"))
    wheel = work / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")  # the kernels find uff-port installed already
    os.environ["UFF_PORT_WHEEL"] = str(wheel)
    rng = random.Random(args.seed)
    per_step = calibrate(work)
    if args.max_steps is None:
        # Speed on a shared machine swings 5x between minutes: cap the size.
        args.max_steps = min(600, max(40, int(args.target_hours * args.scale / per_step)))
    clock = SimClock(args.scale)
    cloud = {
        "kaggle": {"session_hours": 9.0},
        "sagemaker": SM,
        "safety_margin_seconds": 0.75 * HOUR,  # 3 real seconds at scale 4: room for the last checkpoint
        "budgets": {"min_session_minutes": 60},
        "poll": {"interval_seconds": 120, "max_backoff_seconds": 1800},
    }
    cfg = validate_config({**tiny(args.max_steps), "strategy": "hybrid", "cloud": cloud})
    settings = validate_cloud(cfg.cloud)
    api = FakeKaggleApi(work / "fake" / "kaggle")
    s3 = FakeS3(work / "fake" / "s3")
    sm = FakeSageMakerClient(work / "fake" / "sagemaker", s3, grace=max(3.0, 120 / clock.factor))
    sm.kaggle_like.set_faults(sm_real=True)
    run_dir = work / "runs" / "week"
    run_dir.mkdir(parents=True)
    ledger = QuotaLedger(work / "runs" / ".ledger", settings.budgets)
    events: list[tuple[str, dict[str, Any]]] = []

    def factory(name: str) -> Backend:
        inner: Backend
        if name == "kaggle":
            inner = KaggleBackend(api, settings.kaggle, "week", run_dir / "cloud" / "work", sleep=lambda s: time.sleep(0.05))
        else:
            inner = SageMakerBackend(sm, s3, settings.sagemaker, "week")
        return ScaledBackend(inner, clock.factor)

    run = CloudRun(run_dir, cfg, settings, run_id="week", backend_factory=factory, ledger=ledger,
                   emit=lambda ev, **f: events.append((ev, f)), clock=clock, sleep=clock.sleep)
    chaos_log: list[dict[str, Any]] = []
    stop = threading.Event()
    thread = threading.Thread(target=chaos, args=(stop, rng, clock, args.kill_every_hours, sm, chaos_log), daemon=True)
    t0 = time.time()
    thread.start()
    try:
        rc = run.run()
    finally:
        stop.set()
        thread.join()
        for proc in psutil.Process().children(recursive=True):  # our own sessions only
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    wall = time.time() - t0
    sim_hours = (clock() - WEEK_START) / HOUR
    # SageMaker's model dir holds a copy of the run's events: count each step once.
    logs = [p for p in (work / "fake").rglob("events.jsonl") if "model" not in p.relative_to(work).parts]
    computed = count_progress(logs)
    kept = run.journal.data.final_step or 0
    gpu_hours: dict[str, float] = {}
    for u in ledger.usages():
        gpu_hours[u.backend] = round(gpu_hours.get(u.backend, 0.0) + u.seconds / HOUR, 2)
    sessions: dict[str, int] = {}
    for s in run.journal.data.sessions:
        sessions[s.backend] = sessions.get(s.backend, 0) + 1
    base = baseline(work, tiny(args.max_steps))
    report = {
        "command": "scripts/simulate_week.py " + " ".join(sys.argv[1:]),
        "max_steps": args.max_steps,
        "seconds_per_step": round(per_step, 4),
        "exit": rc,
        "steps_kept": kept,
        "steps_computed": computed,
        "goodput": round(kept / computed, 4) if computed else 0.0,
        "gpu_hours": gpu_hours,
        "sessions": sessions,
        "refused_pulls": sum(1 for e, _ in events if e == "cloud_refused"),
        "chaos": chaos_log,
        "simulated_hours": round(sim_hours, 1),
        "wall_s": round(wall, 1),
        "baseline": {"steps_computed": base["steps_computed"], "wall_s": round(base["wall_s"], 1)},
        "compute_vs_baseline": round(computed / base["steps_computed"], 4) if base["steps_computed"] else None,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
