#!/usr/bin/env python
"""The users' week as one campaign, under chaos: random SIGKILLs of trainers and of the BEAM.

    .venv/bin/python scripts/simulate_campaign.py [--max-steps 40] [--trainer-kills 6] [--vm-kills 2] [--seed 3]

Runs the real Elixir campaign (`UffPort.CampaignCLI` in a VM of its own,
`elixir_bridge/test/support/campaign_runner.exs`) on seven tiny models: main
on the local slot, six adapters placed by the planner on the Kaggle and
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


def spec_text(max_steps: int, gates: Path) -> str:
    adapters = "".join(f"""
  - name: {m}
    preset: adapter-{m}
    parent: main
    overrides:
      model.name_or_path: builtin:tiny-llama
      model.local_files_only: true
      model.gradient_checkpointing: false
      training.device: cpu
      training.precision: fp32
      training.micro_batch_size: 4
      training.grad_accum_steps: 2
      training.warmup_steps: 1
      data.seq_len: 256
      lora.dropout: 0.0
""" for m in MANAGERS)
    return f"""name: sim
strategy: hybrid
budgets: {{local_gpus: 1}}
overrides:
  training.max_steps: {max_steps}
  training.progress_every_seconds: 0
  checkpoint.every_steps: 1
  checkpoint.keep_last: 2
  eval.every_steps: null
  output.plot: false
promotion: {{gates: {gates}}}
cloud:
  sagemaker: {{bucket: sim, role_arn: "arn:aws:iam::000000000000:role/sim", image_uri: "sim:1", region: us-east-1, max_runtime_seconds: 900}}
  kaggle: {{session_hours: 0.25}}
  poll: {{interval_seconds: 0.2}}
  safety_margin_seconds: 0
models:
  - name: main
    preset: tiny
    strategy: local
    hours: 12
    overrides: {{data.seq_len: 256, training.micro_batch_size: 4, training.grad_accum_steps: 2}}
{adapters}"""


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


def run_campaign(root: Path, max_steps: int, trainer_kills: int, vm_kills: int, rng: random.Random,
                 min_age: float = 10.0) -> dict[str, Any]:
    root.mkdir(parents=True)
    fake = root / "fake"
    (fake / "sagemaker").mkdir(parents=True)
    (fake / "sagemaker" / "faults.json").write_text('{"sm_real": true}')
    wheel = root / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")
    gates = root / "gates.yaml"
    gates.write_text("schema_version: 1\nlatency: {enabled: false}\nsafety: {enabled: false}\n")
    spec = root / "sim.yaml"
    spec.write_text(spec_text(max_steps, gates))
    env = {**os.environ, "UFF_PORT_CLOUD_FAKE": str(fake), "UFF_PORT_WHEEL": str(wheel),
           "PYTHONPATH": str(REPO), "UFF_PORT_PYTHON": sys.executable}
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
                kind = plan[0]
                if kind == "vm":
                    os.killpg(vm.pid, signal.SIGKILL)
                    vm.wait()
                    kills["vm"] += 1
                    plan.pop(0)
                    time.sleep(2.0)
                    vm = start_vm(root, spec, env, log)
                else:
                    found = trainers(root, min_age)
                    if found:
                        rng.choice(found).send_signal(signal.SIGKILL)
                        kills["trainer"] += 1
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
    # slot utilisation: training wall time per backend / (slots x the span in which that backend trained)
    util = {}
    for backend in ("local", "kaggle", "sagemaker"):
        spans = [iv for j in view.jobs.values() if j.backend == backend for iv in j.intervals if iv[1] is not None]
        if spans:
            busy = sum(e - s for s, e in spans)
            width = max(e for _, e in spans) - min(s for s, _ in spans)
            util[backend] = round(busy / width, 3) if width > 0 else 1.0
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
    args = ap.parse_args()
    global ebin_dir
    ebin_dir = ebin()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="uff-sim-campaign-"))
    out: dict[str, Any] = {"max_steps": args.max_steps, "seed": args.seed, "dir": str(tmp)}
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
