"""Estimated vs measured peak GPU memory for the recommended configs under a 16 GiB cap.

One command (needs a CUDA GPU with >= 16 GiB, torch, transformers, peft; QLoRA rows
need bitsandbytes):

    python scripts/bench_planner_gpu.py [--seq-len 2048] [--out docs/benchmarks.md] [--json-out FILE.json]  (prints; --out replaces only its marked section)

For deepseek-coder-1.3b and -6.7b (random weights, real shapes) it asks the planner
for the recommended single-GPU config on 1x16GiB, runs 3 real steps of it in a
fresh process capped with torch.cuda.set_per_process_memory_fraction(16 GiB), and
reports estimate / measured `max_memory_reserved` (target: within 15%).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uff_port.planner.commands import PlanArgs, compute
from uff_port.planner.probe import ProbeUnavailable, probe_available, run_one, spec_for
from uff_port.planner.sizes import GiB

CAP = 16 * GiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--models", default="deepseek-coder-1.3b,deepseek-coder-6.7b")
    ap.add_argument("--out", default=None, help="put the table in its marked section of this doc")
    ap.add_argument("--json-out", default=None, help="write the rows as JSON to this file")
    ns = ap.parse_args()
    try:
        probe_available()
    except ProbeUnavailable as exc:
        print(f"bench_planner_gpu: {exc}", file=sys.stderr)
        return 3
    rows = []
    records: list[dict[str, object]] = []
    got: dict[str, object] = {}
    for model in ns.models.split(","):
        a = PlanArgs({"model": model, "gpus": "1x16GiB", "seq_len": ns.seq_len})
        result = compute(a)
        best = result["_best"]
        if best is None:
            rows.append(f"| {model} | nothing fits | | | |")
            continue
        got = run_one(spec_for(result, best, CAP))
        est = best.est.reserved
        records.append({"model": model, "recommended": best.est.candidate.label, "estimated_reserved": est,
                        "measured": got})
        if "error" in got:
            rows.append(f"| {model} | {best.est.candidate.label} | {est / GiB:.2f} | failed: {got['error']} | |")
            continue
        meas = got["max_memory_reserved"]
        rows.append(f"| {model} | {best.est.candidate.label} | {est / GiB:.2f} | {meas / GiB:.2f} "
                    f"| {est / meas:.3f} |")
        print(rows[-1], flush=True)
    device = got.get("device", "?") if rows else "?"
    text = (
        "## Memory planner: estimated vs measured (GPU)\n\n"
        f"Command: `python scripts/bench_planner_gpu.py --seq-len {ns.seq_len}` on {device}, "
        "16 GiB cap (set_per_process_memory_fraction), random weights, 3 steps.\n\n"
        "| model | recommended | estimated reserved GiB | measured max_memory_reserved GiB | estimate/measured |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if ns.json_out:
        import json

        Path(ns.json_out).write_text(json.dumps(records, indent=2, default=str) + "\n", encoding="utf-8")
    print(text)
    if ns.out:  # only this script's marked section of the doc (scripts/doc_section.py)
        from doc_section import replace_section

        replace_section(Path(ns.out), "bench_planner_gpu", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
