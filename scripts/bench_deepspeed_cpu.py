"""DeepSpeed ZeRO-2/3 against DDP on 2 CPU processes (gloo), same data and settings.

    python scripts/bench_deepspeed_cpu.py [--steps 30] [--repeats 2] [--out docs/benchmarks.md]  (prints; --out replaces only its marked section)

Each case is a real `python -m uff_port.training` run of the tiny model with
2 processes; cases alternate within a repeat so they share the machine's load.
Reported: tokens/s over the steps after the first 5 (median of the repeats),
its ratio to DDP (the baseline, same invocation), and the final loss (equal
losses show the same training happened). On CPU this measures the overhead of
DeepSpeed's machinery (ZeRO partitioning and its collectives), not what it
buys on GPUs (memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, list[str]] = {
    "ddp (baseline)": ["distributed.backend=ddp"],
    "deepspeed zero2": ["distributed.backend=deepspeed", "distributed.deepspeed_config=configs/deepspeed/zero2.json"],
    "deepspeed zero3": ["distributed.backend=deepspeed", "distributed.deepspeed_config=configs/deepspeed/zero3.json"],
}
SKIP = 5


def run_case(tmp: Path, name: str, sets: list[str], steps: int) -> dict[str, float]:
    cfg = {
        "name": "bench-ds",
        "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
        "data": {"path": "builtin:sample-corpus", "seq_len": 256, "eval_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": steps, "micro_batch_size": 2, "grad_accum_steps": 4, "learning_rate": 0.002,
                     "warmup_steps": 2, "device": "cpu", "precision": "fp32", "progress_every_seconds": 0},
        "checkpoint": {"every_steps": None},
        "eval": {"every_steps": None},
        "output": {"save_final": False, "plot": False},
        "distributed": {"nproc": 2},
    }  # fmt: skip
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp / name.replace(" ", "-").replace("(", "").replace(")", "")
    argv = [sys.executable, "-m", "uff_port.training", "--run-dir", str(run_dir), "--config", str(path), "--fresh"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    prog = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    prog = [e for e in prog if e["event"] == "progress"]
    timed = [e for e in prog if e["step"] > SKIP]
    tokens = timed[-1]["tokens_seen"] - prog[SKIP - 1]["tokens_seen"]
    seconds = timed[-1]["ts"] - prog[SKIP - 1]["ts"]
    return {"tokens_per_s": tokens / seconds, "loss": prog[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="put the markdown table in its marked section of this doc")
    a = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for name, sets in CASES.items():
                results[name].append(run_case(Path(tmp), name, sets, a.steps))
    ddp = [r["tokens_per_s"] for r in results["ddp (baseline)"]]
    rows: list[dict[str, Any]] = []
    for name, rs in results.items():
        per = [r["tokens_per_s"] / d for r, d in zip(rs, ddp, strict=True)]  # same repeat: neighbours in time
        rows.append({"case": name, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                     "ratio": statistics.median(per), "lo": min(per), "hi": max(per), "loss": rs[-1]["loss"]})
    cmd = f"python scripts/bench_deepspeed_cpu.py --steps {a.steps} --repeats {a.repeats}"
    lines = [f"`{cmd}` (2 processes, gloo, tiny model, seq 256, global batch 8; cases alternate in each of "
             f"{a.repeats} repeats)", "",
             "| case | tokens/s (median) | ratio to DDP, median of repeats (min-max) | final loss |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['case']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f}) "
              f"| {r['loss']:.6f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:  # only this script's marked section of the doc (scripts/doc_section.py)
        from doc_section import replace_section

        replace_section(a.out, "bench_deepspeed_cpu", text)


if __name__ == "__main__":
    main()
