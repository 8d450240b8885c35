#!/usr/bin/env python
"""The users' week as one campaign, under chaos: random SIGKILLs of trainers and of the BEAM.

    .venv/bin/python scripts/simulate_campaign.py [--max-steps 40] [--trainer-kills 6] [--vm-kills 2] [--seed 3]
    .venv/bin/python scripts/simulate_campaign.py --week [--hour-seconds 10] [--write-docs]

Runs the real Elixir campaign (`UffPort.CampaignCLI` in a VM of its own,
`elixir_bridge/test/support/campaign_runner.exs`) on seven tiny models: main
on the local slot, six hybrid adapters whose sessions go to the Kaggle and
SageMaker fakes (real training in the fake kernels and containers). While it
runs, trainers (local or inside a fake provider session) are SIGKILLed at
random and the whole VM is SIGKILLed and started again with the same spec.
Then the same campaign runs once without chaos in the same invocation (the
baseline).

Reported per run: goodput = training steps kept (each job's final step) /
training steps computed (every `progress` event of every trainer process of
every job, local and cloud session events alike), the slot utilisation (the
training phases' wall time / the slots' time while any job trained), provider
submissions against journaled sessions (duplicates), the final states and the
wall time. Prints one JSON document.

`--week` runs the users' week instead, in compressed time: one simulated
hour lasts `--hour-seconds` real seconds (`UFF_PORT_TIME_SCALE`, read by the
worker's cloud jobs and the planner: uff_port/cloud/timescale.py), the spec
has the users' budgets (30 h a week of Kaggle in 9 h sessions, 4 h a day of
SageMaker, one local GPU), main is sized to 12 GPU-hours and each adapter to
`--adapter-hours` of compute at the speed measured on this machine first
(`--calibrate-jobs` trainers at once: the Kaggle and SageMaker trainers share
this machine's cores).
Trainers and the VM are SIGKILLed at random meanwhile. Besides goodput it
reports the share of the week's budget used: GPU-hours billed per backend
(the cloud ledger; local: the training phases in the journal) against the
hours the plan placed there. `--write-docs` puts the figures into
docs/benchmarks.md (the script's own marked section only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
BRIDGE = REPO / "elixir_bridge"
RUNNER = BRIDGE / "test" / "support" / "campaign_runner.exs"
MANAGERS = ("ufm", "ucm", "urm", "ulm", "uim", "uam")


HOUR = 3600.0


ADAPTER_OVERRIDES = {
    "model.name_or_path": "builtin:tiny-llama", "model.local_files_only": True, "model.gradient_checkpointing": False,
    "training.device": "cpu", "training.precision": "fp32", "training.micro_batch_size": 4,
    "training.grad_accum_steps": 2, "training.warmup_steps": 1, "data.seq_len": 256, "lora.dropout": 0.0,
}
MAIN_OVERRIDES = {"data.seq_len": 256, "training.micro_batch_size": 4, "training.grad_accum_steps": 2}
SIM_SAGEMAKER = {"bucket": "sim", "role_arn": "arn:aws:iam::000000000000:role/sim", "image_uri": "sim:1",
                 "region": "us-east-1"}


def sim_spec(gates: Path, budgets: dict[str, Any], overrides: dict[str, Any], cloud: dict[str, Any],
             main: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None) -> str:
    """The campaign spec: main on the local slot, the six adapters (tiny models from the adapter presets) hybrid;
    `main` and `adapter` are extra model fields (`hours`) and overrides (`overrides`)."""
    import yaml

    main, adapter = main or {}, adapter or {}
    spec = {
        "name": "sim", "strategy": "hybrid", "budgets": budgets, "overrides": overrides,
        "promotion": {"gates": str(gates)}, "cloud": cloud,
        "models": [{"name": "main", "preset": "tiny", "strategy": "local", "hours": 12,
                    "overrides": {**main.get("overrides", {}), **MAIN_OVERRIDES}}]
        + [{"name": m, "preset": f"adapter-{m}", "parent": "main", **{k: v for k, v in adapter.items() if k != "overrides"},
            "overrides": {**ADAPTER_OVERRIDES, **adapter.get("overrides", {})}} for m in MANAGERS],
    }
    return yaml.safe_dump(spec, sort_keys=False)


def spec_text(max_steps: int, gates: Path) -> str:
    """The chaos run: short sessions, a checkpoint every step."""
    return sim_spec(
        gates, {"local_gpus": 1},
        {"training.max_steps": max_steps, "training.progress_every_seconds": 0, "checkpoint.every_steps": 1,
         "checkpoint.keep_last": 2, "eval.every_steps": None, "output.plot": False},
        {"sagemaker": {**SIM_SAGEMAKER, "max_runtime_seconds": 900}, "kaggle": {"session_hours": 0.25},
         "poll": {"interval_seconds": 0.2}, "safety_margin_seconds": 0})


def week_overrides(ckpt: int) -> dict[str, Any]:
    """The campaign-wide overrides of the week (one CPU thread per trainer: two share this machine)."""
    return {"training.progress_every_seconds": 0, "training.cpu_threads": 1, "checkpoint.every_steps": ckpt,
            "checkpoint.keep_last": 2, "eval.every_steps": None, "output.plot": False}


def week_spec_text(gates: Path, main_steps: int, adapter_steps: int, adapter_hours: float, ckpt: int) -> str:
    """The users' week: their budgets, 9 h Kaggle and 4 h SageMaker sessions, jobs sized in steps to their hours."""
    return sim_spec(
        gates, {"local_gpus": 1, "kaggle_hours_per_week": 30, "sagemaker_hours_per_day": 4}, week_overrides(ckpt),
        {"sagemaker": {**SIM_SAGEMAKER, "max_runtime_seconds": 14400}, "kaggle": {"session_hours": 9},
         "budgets": {"min_session_minutes": 60}, "poll": {"interval_seconds": 120, "max_backoff_seconds": 1800},
         "safety_margin_seconds": 1800},
        main={"overrides": {"training.max_steps": main_steps}},
        adapter={"hours": adapter_hours, "overrides": {"training.max_steps": adapter_steps}})


def calibrate(root: Path, preset: str, overrides: dict[str, Any], jobs: int, steps: int = 40) -> float:
    """Real seconds per training step of a job's own config (its preset and overrides, the week's
    checkpoint interval included) on this machine, now, with `jobs` trainers at once; the first
    steps (warm-up) are left out."""
    import yaml

    from uff_port.core.config import load_config_file, validate_config

    root.mkdir(parents=True, exist_ok=True)
    cfg = validate_config(load_config_file(preset), {**overrides, "training.max_steps": steps})
    (root / "cal.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    procs = [subprocess.Popen([sys.executable, "-m", "uff_port.training", "--run-dir", str(root / f"cal{i}"),
                               "--config", str(root / "cal.yaml")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(jobs)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("calibration run failed")
    rates = []
    for i in range(jobs):
        ts = [json.loads(line)["ts"] for line in (root / f"cal{i}" / "events.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "progress"][5:]
        rates.append((ts[-1] - ts[0]) / max(1, len(ts) - 1))
    return max(1e-3, sorted(rates)[len(rates) // 2])


def run_week(root: Path, hour_seconds: float, adapter_hours: float, trainer_kills: int, vm_kills: int,
             rng: random.Random, ckpt: int, calibrate_jobs: int) -> dict[str, Any]:
    import datetime as dt

    # each on its own config: main trains alone on the local slot, the adapters up to two at a time
    week = week_overrides(ckpt)
    main_per_step = calibrate(root / "calibrate-main", "tiny", {**week, **MAIN_OVERRIDES}, jobs=1)
    per_step = calibrate(root / "calibrate", f"adapter-{MANAGERS[0]}", {**week, **ADAPTER_OVERRIDES},
                         jobs=calibrate_jobs)
    main_steps = max(10, int(12 * hour_seconds / main_per_step))
    adapter_steps = max(10, int(adapter_hours * hour_seconds / per_step))
    root = root / "week"
    root.mkdir(parents=True)
    gates, env = sandbox(root)
    spec = root / "sim.yaml"
    spec.write_text(week_spec_text(gates, main_steps, adapter_steps, adapter_hours, ckpt))
    # the simulated week starts on a Monday 00:00 UTC (the Kaggle week and a SageMaker day begin together)
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    week_start = (today + dt.timedelta(days=7 - today.weekday())).timestamp()
    origin = time.time()
    env |= {"UFF_PORT_TIME_SCALE": str(HOUR / hour_seconds), "UFF_PORT_TIME_ORIGIN": str(origin),
            "UFF_PORT_TIME_START": str(week_start)}
    deadline = origin + 7 * 24 * hour_seconds * 1.5
    plan = ["trainer"] * trainer_kills + ["vm"] * vm_kills
    rng.shuffle(plan)
    # the kills spread over the first days, when every backend trains
    pause = (2 * 24 * hour_seconds) / max(1, len(plan))
    kills = {"trainer": 0, "vm": 0}
    finished = False
    with open(root / "vm.log", "ab") as log:
        vm = start_vm(root, spec, env, log)
        next_kill = time.time() + rng.uniform(0.5, 1.5) * pause
        while time.time() < deadline:
            if vm.poll() is not None:
                if vm.returncode == 0:
                    finished = True
                    break
                raise SystemExit(f"campaign VM exited {vm.returncode}; see {root / 'vm.log'}")
            if plan and time.time() >= next_kill:
                vm, landed = kill_one(plan[0], vm, root, spec, env, log, rng, 5.0, kills)
                if landed:
                    plan.pop(0)
                    next_kill = time.time() + rng.uniform(0.5, 1.5) * pause
            time.sleep(0.5)
        if vm.poll() is None:
            os.killpg(vm.pid, signal.SIGKILL)
            vm.wait()
    elapsed = time.time() - origin
    result = {"elapsed_s": round(elapsed, 1), "sim_hours": round(elapsed / hour_seconds, 1), "finished": finished,
              "hour_seconds": hour_seconds, "seconds_per_step": round(per_step, 4),
              "main_seconds_per_step": round(main_per_step, 4),
              "steps": {"main": main_steps, "adapter": adapter_steps}, "kills": kills,
              **measure(root), "budget": budget_share(root, hour_seconds, week_start, origin)}
    cleanup(root)
    return result


def budget_share(root: Path, hour_seconds: float, week_start: float, origin: float) -> dict[str, Any]:
    """GPU-hours used per backend inside the simulated week against what the plan placed there; hours
    after the week's end (work that did not fit) are reported apart (`after_week_hours`)."""
    from uff_port.campaign.journal import fold, load
    from uff_port.cloud.ledger import QuotaLedger

    cdir = root / "runs" / "campaigns" / "sim"
    journal = load(cdir)
    view = fold(journal)
    planned: dict[str, float] = {"local": 0.0, "kaggle": 0.0, "sagemaker": 0.0}
    for rec in journal.records:
        if rec.get("kind") == "plan":
            for e in (rec.get("placement") or {}).get("entries") or []:
                planned[e["backend"]] += float(e["hours"])
            for j in rec.get("jobs") or []:
                if j.get("backend") == "local":
                    planned["local"] += float(j.get("hours") or 0)
            break
    used = {"local": 0.0, "kaggle": 0.0, "sagemaker": 0.0}
    after = dict(used)

    def add(backend: str, start: float, end: float, week_end: float, per_hour: float) -> None:
        inside = max(0.0, min(end, week_end) - start)
        used[backend] += inside / per_hour
        after[backend] += max(0.0, end - start - inside) / per_hour

    for u in QuotaLedger(root / "runs" / ".cloud-ledger.jsonl").usages():  # simulated seconds
        if u.final:
            add(u.backend, u.start, u.start + u.seconds, week_start + 7 * 86400, HOUR)
    for j in view.jobs.values():  # the journal's real seconds
        if j.backend == "local":
            for s, e in j.intervals:
                if e is not None:
                    add("local", s, e, origin + 7 * 24 * hour_seconds, hour_seconds)
    cloud_plan = planned["kaggle"] + planned["sagemaker"]
    cloud_used = used["kaggle"] + used["sagemaker"]
    return {
        "planned_hours": {k: round(v, 2) for k, v in planned.items()},
        "used_hours": {k: round(v, 2) for k, v in used.items()},
        "after_week_hours": {k: round(v, 2) for k, v in after.items()},
        "share": {k: round(used[k] / planned[k], 3) for k in planned if planned[k]},
        "cloud_share": round(cloud_used / cloud_plan, 3) if cloud_plan else None,
        "budget_hours": {"kaggle": 30.0, "sagemaker": 28.0},
    }


def week_table(out: dict[str, Any], cmd: str) -> str:
    w = out["week"]
    b = w["budget"]
    sh = b["share"]
    return "\n".join([
        "| command | simulated hours (real s) | kills (trainer / VM) | steps kept / computed | goodput "
        "| GPU-hours used / planned: local, Kaggle, SageMaker | cloud budget share | finished |",
        "|---|---|---|---|---|---|---|---|",
        f"| `{cmd}` (seed {out['seed']}) | {w['sim_hours']} ({w['elapsed_s']} s) | {w['kills']['trainer']} / "
        f"{w['kills']['vm']} | {w['steps_kept']} / {w['steps_computed']} | **{w['goodput']}** | "
        + ", ".join(f"{b['used_hours'][k]} / {b['planned_hours'][k]} ({sh.get(k, '-')})"
                    for k in ("local", "kaggle", "sagemaker"))
        + f" | **{b['cloud_share']}** | {'yes' if w['finished'] else 'no'} |",
        "",
        "GPU-hours used after the week's end (work that did not fit; not in the share): "
        + ", ".join(f"{k} {b['after_week_hours'][k]}" for k in ("local", "kaggle", "sagemaker")) + ".",
        "",
        f"Sizes: {w['hour_seconds']} real s per simulated hour; s per step measured first: main alone "
        f"{w['main_seconds_per_step']}, adapters two at once {w['seconds_per_step']}; "
        f"main {w['steps']['main']} steps (12 h), each adapter {w['steps']['adapter']} steps; "
        f"submissions Kaggle {w['submissions']['kaggle']}, SageMaker {w['submissions']['sagemaker']} "
        f"({w['submissions']['sagemaker_unique']} unique) against journaled sessions "
        f"{w['journaled_sessions']['kaggle']} / {w['journaled_sessions']['sagemaker']}; final states: "
        + ", ".join(f"{n} {j['state']} ({j['backend']})" for n, j in w["jobs"].items()) + ".",
    ])


def ebin() -> Path:
    subprocess.run(["mix", "compile"], cwd=BRIDGE, check=True, capture_output=True)
    return BRIDGE / "_build" / "dev" / "lib" / "uff_port" / "ebin"


def start_vm(root: Path, spec: Path, env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    cmd = ["elixir", "-pa", str(ebin_dir), str(RUNNER), "run", str(spec), "--runs-root", str(root / "runs"),
           "--python", sys.executable, "--heartbeat-interval", "0.5", "--quiet"]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def trainers(root: Path, min_age: float) -> list[psutil.Process]:
    """Trainer processes of this simulation (local, and inside fake provider sessions) past loading."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd", "create_time"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if ("uff_port.training" in cmd and "torchrun" not in cmd
                    and (str(root) in cmd or str(root) in (p.info["cwd"] or ""))
                    and time.time() - p.info["create_time"] >= min_age):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def sandbox(root: Path) -> tuple[Path, dict[str, str]]:
    """The fake providers, a stand-in wheel and gates that judge only the scores, under `root`;
    the gates file and the campaign VM's environment."""
    fake = root / "fake"
    (fake / "sagemaker").mkdir(parents=True)
    (fake / "sagemaker" / "faults.json").write_text('{"sm_real": true}')
    wheel = root / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")
    gates = root / "gates.yaml"
    gates.write_text("schema_version: 1\nlatency: {enabled: false}\nsafety: {enabled: false}\n")
    env = {**os.environ, "UFF_PORT_CLOUD_FAKE": str(fake), "UFF_PORT_WHEEL": str(wheel),
           "PYTHONPATH": str(REPO), "UFF_PORT_PYTHON": sys.executable}
    return gates, env


def kill_one(kind: str, vm: subprocess.Popen[bytes], root: Path, spec: Path, env: dict[str, str], log: Any,
             rng: random.Random, min_age: float, kills: dict[str, int]) -> tuple[subprocess.Popen[bytes], bool]:
    """One chaos kill: the whole VM (then started again), or a random trainer at least `min_age`
    seconds old. Returns the VM now running and whether the kill landed (no trainer: it did not)."""
    if kind == "vm":
        os.killpg(vm.pid, signal.SIGKILL)
        vm.wait()
        kills["vm"] += 1
        time.sleep(2.0)
        return start_vm(root, spec, env, log), True
    found = trainers(root, min_age)
    if not found:
        return vm, False
    rng.choice(found).send_signal(signal.SIGKILL)
    kills["trainer"] += 1
    return vm, True


def run_campaign(root: Path, max_steps: int, trainer_kills: int, vm_kills: int, rng: random.Random,
                 min_age: float = 10.0) -> dict[str, Any]:
    root.mkdir(parents=True)
    gates, env = sandbox(root)
    spec = root / "sim.yaml"
    spec.write_text(spec_text(max_steps, gates))
    t0 = time.time()
    kills = {"trainer": 0, "vm": 0}
    # chaos: a list of (kind) in random order, each after a random pause while training runs
    plan = ["trainer"] * trainer_kills + ["vm"] * vm_kills
    rng.shuffle(plan)
    with open(root / "vm.log", "ab") as log:
        vm = start_vm(root, spec, env, log)
        while True:
            if vm.poll() is not None:
                if vm.returncode == 0:
                    break
                raise SystemExit(f"campaign VM exited {vm.returncode}; see {root / 'vm.log'}")
            if plan:
                time.sleep(rng.uniform(3.0, 8.0))
                if vm.poll() is not None:
                    continue
                vm, landed = kill_one(plan[0], vm, root, spec, env, log, rng, min_age, kills)
                if landed:
                    plan.pop(0)
            else:
                time.sleep(1.0)
    elapsed = time.time() - t0
    result = {"elapsed_s": round(elapsed, 1), "kills": kills, **measure(root)}
    cleanup(root)
    return result


def cleanup(root: Path) -> None:
    """Nothing of this run may outlive it (a detached fake session, a trainer it restarted)."""
    for _ in range(3):
        left = [p for p in psutil.process_iter(["cmdline", "cwd"])
                if str(root) in " ".join(p.info["cmdline"] or []) + (p.info["cwd"] or "") and p.pid != os.getpid()]
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(1.0)


def measure(root: Path) -> dict[str, Any]:
    from uff_port.campaign.journal import fold, load

    runs = root / "runs"
    view = fold(load(runs / "campaigns" / "sim"))
    computed = kept = 0
    per_job = {}
    for name, job in view.jobs.items():
        events = runs / "campaigns" / "sim" / name / "events.jsonl"
        steps = 0
        if events.exists():
            for line in events.read_text(encoding="utf-8").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "progress":
                    steps += 1
        computed += steps
        kept += job.step or 0
        per_job[name] = {"state": job.state, "backend": job.backend, "kept": job.step, "computed": steps}
    sessions = {"kaggle": 0, "sagemaker": 0}
    for j in runs.glob("campaigns/sim/*/cloud/journal.json"):
        for s in json.loads(j.read_text())["sessions"]:
            sessions[s["backend"]] += 1
    log = root / "fake" / "sagemaker" / "creations.log"
    creations = log.read_text().split() if log.exists() else []
    pushes = len(list((root / "fake" / "kaggle" / "kernels").glob("*/v*")))
    # slot utilisation: training wall time per backend / (slots x the span in which that backend trained);
    # hybrid jobs share the two cloud slots
    util = {}
    for backend, slots in (("local", 1), ("kaggle", 1), ("sagemaker", 1), ("hybrid", 2)):
        spans = [iv for j in view.jobs.values() if j.backend == backend for iv in j.intervals if iv[1] is not None]
        if spans:
            busy = sum(e - s for s, e in spans)
            width = max(e for _, e in spans) - min(s for s, _ in spans)
            util[backend] = round(busy / (slots * width), 3) if width > 0 else 1.0
    return {
        "goodput": round(kept / computed, 4) if computed else None,
        "steps_kept": kept, "steps_computed": computed,
        "slot_utilisation": util,
        "submissions": {"kaggle": pushes, "sagemaker": len(creations), "sagemaker_unique": len(set(creations))},
        "journaled_sessions": sessions,
        "campaign_starts": view.starts,
        "release": (view.release or {}).get("name"),
        "jobs": per_job,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--min-trainer-age", type=float, default=10.0,
                    help="kill only trainers this old (s): past loading, into their steps")
    ap.add_argument("--trainer-kills", type=int, default=6)
    ap.add_argument("--vm-kills", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--week", action="store_true", help="the users' week with its budgets, in compressed time")
    ap.add_argument("--hour-seconds", type=float, default=10.0, help="--week: real seconds per simulated hour "
                    "(a session's fixed real overhead, start and model load, is about 15 s: keep it small against 9 h)")
    ap.add_argument("--adapter-hours", type=float, default=8.0, help="--week: each adapter's GPU-hours")
    ap.add_argument("--checkpoint-every", type=int, default=5, help="--week: checkpoint.every_steps")
    ap.add_argument("--calibrate-jobs", type=int, default=2, help="--week: trainers at once while the speed is measured")
    ap.add_argument("--write-docs", action="store_true", help="--week: put the figures into docs/benchmarks.md")
    args = ap.parse_args()
    global ebin_dir
    ebin_dir = ebin()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="uff-sim-campaign-"))
    out: dict[str, Any] = {"max_steps": args.max_steps, "seed": args.seed, "dir": str(tmp)}
    if args.week:
        out.pop("max_steps")
        out["week"] = run_week(tmp, args.hour_seconds, args.adapter_hours, args.trainer_kills, args.vm_kills, rng,
                               args.checkpoint_every, args.calibrate_jobs)
        print(json.dumps(out, indent=2))
        if args.write_docs:
            sys.path.insert(0, str(REPO / "scripts"))
            from doc_section import replace_section

            cmd = ("python scripts/simulate_campaign.py --week --hour-seconds "
                   f"{args.hour_seconds:g} --calibrate-jobs {args.calibrate_jobs} --trainer-kills {args.trainer_kills} "
                   f"--vm-kills {args.vm_kills}")
            replace_section(REPO / "docs" / "benchmarks.md", "simulate_campaign", week_table(out, cmd))
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    out["chaos"] = run_campaign(tmp / "chaos", args.max_steps, args.trainer_kills, args.vm_kills, rng,
                                args.min_trainer_age)
    if not args.no_baseline:
        out["baseline"] = run_campaign(tmp / "baseline", args.max_steps, 0, 0, rng)
    print(json.dumps(out, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


ebin_dir = Path()

if __name__ == "__main__":
    sys.exit(main())
