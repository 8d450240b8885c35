#!/usr/bin/env python
"""Kill-9 torture of exact resume: SIGKILL the trainer again and again, then compare.

Trains the tiny model once without interruption (the reference), then trains
the same config in another run directory while killing the trainer with
SIGKILL at random moments: during start-up, between and inside steps, and in
the middle of a checkpoint write (UFF_PORT_CHECKPOINT_KILL_AT makes the
trainer kill itself at a chosen commit sub-step). Every restart resumes on its
own from the run directory. At the end, every loss ever reported for step s
must equal the reference loss of step s bit for bit, and the final adapter's
sha256 must be identical.

    .venv/bin/python scripts/torture_resume.py --kills 100 --max-steps 200 --worker-kills 10

`--worker-kills N` then does the same N times to the whole worker
(`uff-port serve`): its orphaned trainer must checkpoint and exit, and the same
`train` sent to a new worker must resume exactly.

tests/test_checkpoint_torture.py runs the same harness with fewer kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parents[1]
KILL_AT_ENV: Final = "UFF_PORT_CHECKPOINT_KILL_AT"
# What runs the trainer; `--entry FILE` swaps in another script (to diagnose a fix).
ENTRY: list[str] = ["-m", "uff_port.training"]
WRITE_POINTS: Final = ("begun", "files_synced", "manifest_written", "renamed", "latest_written", "pruned")


def torture_config(max_steps: int, every_steps: int) -> dict[str, Any]:
    """The tiny model, small enough that a step takes ~0.1 s on one CPU thread.

    Dropout and a shuffle buffer are on so that the RNG and the shuffle state
    must be restored exactly, not just the weights.
    """
    return {
        "name": "torture",
        "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
        "data": {"path": "builtin:sample-corpus", "seq_len": 64, "shuffle_buffer": 8, "eval_fraction": 0.05},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "training": {
            "max_steps": max_steps, "seed": 99, "micro_batch_size": 2, "grad_accum_steps": 2,
            "learning_rate": 0.003, "warmup_steps": 3, "device": "cpu", "precision": "fp32",
            "progress_every_seconds": 0,
        },
        "checkpoint": {"every_steps": every_steps, "keep_last": 2},
        "eval": {"every_steps": None, "max_batches": 2},
        "output": {"plot": False},
    }


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # One thread: the loss is the same, and 2 shared cores are not oversubscribed.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    env.pop(KILL_AT_ENV, None)
    env.update(extra or {})
    return env


def start(run_dir: Path, config: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *ENTRY, "--run-dir", str(run_dir), "--config", str(config)],
        env=child_env(extra_env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event; a line torn by SIGKILL and glued to the next run's first line is split."""
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        for piece in ([line] if line.startswith('{"event"') else []) + [line[line.rfind('{"event"') :]]:
            try:
                out.append(json.loads(piece))
                break
            except ValueError:
                continue
    return out


def losses_by_step(events: list[dict[str, Any]]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for e in events:
        if e.get("event") == "progress":
            out.setdefault(int(e["step"]), []).append(e["loss"])
    return out


def adapter_sha(run_dir: Path) -> str:
    from uff_port.hashing import sha256_file

    return sha256_file(run_dir / "final" / "adapter_model.safetensors")


def write_config(run_dir: Path, cfg: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def reference_run(run_dir: Path, cfg: dict[str, Any], timeout: float = 300) -> tuple[dict[int, float], str]:
    proc = start(run_dir, write_config(run_dir, cfg))
    rc = proc.wait(timeout)
    if rc != 0:
        raise RuntimeError(f"reference run exited {rc}; see {run_dir / 'events.jsonl'}")
    return {s: v[-1] for s, v in losses_by_step(read_events(run_dir)).items()}, adapter_sha(run_dir)


@dataclass
class TortureResult:
    kills: Counter[str] = field(default_factory=Counter)
    segments: int = 0
    final_rc: int | None = None
    seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)
    missing_steps: list[int] = field(default_factory=list)
    quarantined: int = 0
    resumes: int = 0
    discontinuities: int = 0
    """`loss_discontinuity` warnings: an exact resume must raise none."""

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())


_PROGRESS: Final = b'{"event":"progress"'


def _progress_count(run_dir: Path) -> tuple[int, int]:
    """(progress events so far, step of the last one); cheap enough to poll."""
    try:
        data = (run_dir / "events.jsonl").read_bytes()
    except FileNotFoundError:
        return 0, 0
    count = data.count(_PROGRESS)
    if not count:
        return 0, 0
    tail = data[data.rfind(_PROGRESS) :].split(b"\n", 1)[0]
    try:
        return count, int(json.loads(tail)["step"])
    except (ValueError, KeyError):  # torn by a kill: the one before it will do
        return count, 0


def _committed_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "LATEST"
    try:
        return int(latest.read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def _wait_or_kill(proc: subprocess.Popen[bytes], until: float) -> int | None:
    while time.monotonic() < until:
        rc = proc.poll()
        if rc is not None:
            return rc
        time.sleep(0.01)
    return None


def torture(
    run_dir: Path, cfg: dict[str, Any], kills: int, seed: int, segment_timeout: float = 120.0
) -> TortureResult:
    """Kill the trainer `kills` times at random moments, then let it finish."""
    rng = random.Random(seed)
    config = write_config(run_dir, cfg)
    max_steps = cfg["training"]["max_steps"]
    every = cfg["checkpoint"]["every_steps"]
    res = TortureResult()
    t_start = time.monotonic()
    while True:
        n0, _ = _progress_count(run_dir)
        base = _committed_step(run_dir)
        next_ckpt = min((base // every + 1) * every, max_steps)
        if res.total_kills >= kills:
            kind = "none"
        elif base + 2 * every + 1 >= max_steps or res.total_kills % 4 == 3 or rng.random() < 0.1:
            kind = "mid-write"  # always lands: the trainer kills itself at that sub-step
        elif rng.random() < 0.15:
            kind = "startup"
        else:
            kind = "training"
        # The final checkpoint is only ever killed before LATEST moves, or the
        # run would finish before the kills are all done.
        points = WRITE_POINTS if next_ckpt < max_steps else WRITE_POINTS[:4]
        extra = {KILL_AT_ENV: f"{next_ckpt}:{rng.choice(points)}"} if kind == "mid-write" else None
        proc = start(run_dir, config, extra)
        res.segments += 1
        deadline = time.monotonic() + segment_timeout
        rc: int | None = None
        if kind == "startup":
            rc = _wait_or_kill(proc, time.monotonic() + rng.uniform(0.2, 3.0))
        elif kind == "training":
            want = rng.randint(1, 2 * every)
            while rc is None and time.monotonic() < deadline:
                rc = proc.poll()
                if _progress_count(run_dir)[0] - n0 >= want:
                    rc = _wait_or_kill(proc, time.monotonic() + rng.uniform(0.0, 0.15))
                    break
                time.sleep(0.03)
        else:
            rc = _wait_or_kill(proc, deadline)
        if rc is None and kind in ("startup", "training"):
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(30)
            res.kills[kind] += 1
        elif rc == -signal.SIGKILL and kind == "mid-write":
            res.kills[kind] += 1
        elif rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            raise RuntimeError(f"segment {res.segments} ({kind}) did not finish in {segment_timeout} s")
        if rc == 0:
            res.final_rc = 0
            break
        if rc != -signal.SIGKILL:
            raise RuntimeError(f"segment {res.segments} ({kind}) exited {rc}; see {run_dir / 'events.jsonl'}")
    return _tally(res, run_dir, t_start)


def _tally(res: TortureResult, run_dir: Path, t_start: float) -> TortureResult:
    """What the run's events say about the torture: quarantines, resumes, discontinuities."""
    res.seconds = time.monotonic() - t_start
    events = read_events(run_dir)
    res.quarantined = sum(e.get("event") == "checkpoint_quarantined" for e in events)
    res.resumes = sum(e.get("event") == "log" and "resumed_from" in e for e in events)
    res.discontinuities = sum(e.get("code") == "loss_discontinuity" for e in events)
    return res


def _trainers_of(run_dir: Path) -> list[Any]:
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "uff_port.training" in cmd and str(run_dir) in cmd:
            out.append(proc)
    return out


def torture_worker(
    runs_root: Path, name: str, cfg: dict[str, Any], kills: int, seed: int, timeout: float = 180.0
) -> TortureResult:
    """SIGKILL the whole worker (`uff-port serve`) mid-training; a new worker gets the same `train`.

    The orphaned trainer hears of it (channel EOF / parent-death signal), makes
    a final checkpoint and exits 75; the next `train` must resume from it.
    """
    import psutil

    from uff_port.client import WorkerClient

    rng = random.Random(seed)
    run_dir = (runs_root / name).resolve()
    res = TortureResult()
    t_start = time.monotonic()
    while True:
        n0, _ = _progress_count(run_dir)
        with WorkerClient(runs_root=runs_root, env=child_env(), stderr=subprocess.DEVNULL) as client:
            client.request("train", {"config": cfg, "run_dir": name}, timeout=60)
            res.segments += 1
            if res.total_kills >= kills:
                client.wait_event(lambda e: e.get("event") in ("finished", "failed"), timeout=timeout)
                res.final_rc = 0 if client.events_named("finished") else 1
                client.shutdown()
                break
            want = rng.randint(1, 6)
            deadline = time.monotonic() + timeout
            ended = False
            while _progress_count(run_dir)[0] - n0 < want:
                # A short run can end before `want` more steps: that is the run finishing, not a hang.
                if client.events_named("finished") or client.events_named("failed"):
                    ended = True
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker segment {res.segments} made no progress")
                time.sleep(0.03)
            if ended:
                res.final_rc = 0 if client.events_named("finished") else 1
                client.shutdown()
                break
            time.sleep(rng.uniform(0.0, 0.15))
            trainers = _trainers_of(run_dir)
            client.kill()
            res.kills["worker"] += 1
        # The supervisor's restart must not race the orphan's final checkpoint.
        _gone, alive = psutil.wait_procs(trainers, timeout=timeout)
        if alive:
            raise RuntimeError(f"orphaned trainer(s) {[p.pid for p in alive]} outlived their worker")
    return _tally(res, run_dir, t_start)


def compare(res: TortureResult, reference: dict[int, float], run_dir: Path) -> None:
    """Fill res.mismatches / res.missing_steps: every loss ever seen for a step must be the reference's."""
    seen = losses_by_step(read_events(run_dir))
    res.missing_steps = sorted(set(reference) - set(seen))
    for step, values in sorted(seen.items()):
        for v in values:
            if v != reference.get(step):
                res.mismatches.append(f"step {step}: {v!r} != reference {reference.get(step)!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--every-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=None, help="default: a fresh temporary directory")
    p.add_argument("--worker-kills", type=int, default=10, help="then SIGKILL the whole worker this often")
    p.add_argument("--entry", type=Path, default=None, help="a script to run instead of -m uff_port.training")
    args = p.parse_args(argv)
    import tempfile

    if args.entry is not None:
        ENTRY[:] = [str(args.entry)]

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="torture-"))
    cfg = torture_config(args.max_steps, args.every_steps)
    t0 = time.monotonic()
    reference, ref_sha = reference_run(work / "reference", cfg)
    ref_s = time.monotonic() - t0
    res = torture(work / "tortured", cfg, args.kills, args.seed)
    compare(res, reference, work / "tortured")
    same_adapter = adapter_sha(work / "tortured") == ref_sha
    report = {
        "command": " ".join(["python", *sys.argv]),
        "work_dir": str(work),
        "max_steps": args.max_steps,
        "every_steps": args.every_steps,
        "reference_seconds": round(ref_s, 1),
        "tortured_seconds": round(res.seconds, 1),
        "segments": res.segments,
        "kills": dict(res.kills),
        "total_kills": res.total_kills,
        "resumes": res.resumes,
        "quarantined": res.quarantined,
        "loss_discontinuity_warnings": res.discontinuities,
        "loss_mismatches": res.mismatches[:10],
        "missing_steps": res.missing_steps,
        "final_adapter_identical": same_adapter,
    }
    ok = same_adapter and not res.mismatches and not res.missing_steps and res.total_kills >= args.kills
    if args.worker_kills:
        wres = torture_worker(work, "worker-job", cfg, args.worker_kills, args.seed)
        compare(wres, reference, work / "worker-job")
        w_same = adapter_sha(work / "worker-job") == ref_sha
        report["worker"] = {
            "seconds": round(wres.seconds, 1),
            "kills": wres.total_kills,
            "resumes": wres.resumes,
            "quarantined": wres.quarantined,
            "loss_mismatches": wres.mismatches[:10],
            "missing_steps": wres.missing_steps,
            "final_adapter_identical": w_same,
        }
        ok = ok and w_same and not wres.mismatches and not wres.missing_steps
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
