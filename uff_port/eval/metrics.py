"""Suite results as artifact metrics, and the code-evaluation gate on them.

An artifact manifest's `metrics` is a flat `{name: number}` map, exchanged
between sites as is; suite results are flattened into it so that a manifest
alone is enough for the gate, local or cloud-trained alike:

    eval/<suite>/pass@<k>              pass@k over the suite
    eval/<suite>/<manager>/pass@1      per manager domain
    eval/<suite>/digest                first 48 bits of the suite digest (comparable only if equal)
    eval/<suite>/task/<task_id>        the task's pass rate (what the paired test pairs)

The gate compares the candidate with the stable release on the SAME tasks
(same digest) with `stats.compare`: a significant regression fails, and
`require_significant` makes anything short of a significant improvement fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from uff_port.eval.stats import compare

PREFIX: Final = "eval/"
SCHEMA: Final = "uff-port.eval/1"


def flatten(result: dict[str, Any]) -> dict[str, float]:
    """One results document (`eval/<suite>.json`) as manifest metrics."""
    suite = result["suite"]
    base = f"{PREFIX}{suite}/"
    out: dict[str, float] = {base + "digest": float(int(result["suite_digest"][:12], 16))}
    for key, value in result["metrics"].items():
        if key.startswith("pass@"):
            out[base + key] = float(value)
    for manager, row in result.get("by_manager", {}).items():
        if manager != "-" and "pass@1" in row:
            out[f"{base}{manager}/pass@1"] = float(row["pass@1"])
    for task_id, rate in result.get("per_task", {}).items():
        out[f"{base}task/{task_id}"] = float(rate)
    return out


def suite_metrics(run_dir: str | Path) -> dict[str, float]:
    """Metrics of every results file in `RUN_DIR/eval/`; unreadable or foreign files are skipped."""
    out: dict[str, float] = {}
    for path in sorted(Path(run_dir, "eval").glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
                out.update(flatten(doc))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def per_task(metrics: dict[str, Any], suite: str) -> dict[str, float]:
    head = f"{PREFIX}{suite}/task/"
    return {k[len(head):]: float(v) for k, v in metrics.items() if k.startswith(head) and v is not None}


def gate(metrics: dict[str, Any], baseline: dict[str, Any] | None, suite: str, metric: str = "pass@1",
         threshold: float | None = None, alpha: float = 0.05,
         require_significant: bool = False) -> tuple[str, str, str, str]:
    """(status, measured, threshold, detail) of the code-evaluation gate; status pass/fail."""
    key = f"{PREFIX}{suite}/{metric}"
    bound = [f">= {threshold:g}"] if threshold is not None else []
    value = metrics.get(key)
    if value is None:
        return "fail", "missing", key, f"no metrics.{key}: evaluate the run on {suite} before registering"
    problems = []
    if threshold is not None and value < threshold:
        problems.append(f"{metric} {value:.3f} below threshold {threshold:g}")
    detail = ""
    base_value = baseline.get(key) if baseline else None
    same = baseline is not None and baseline.get(f"{PREFIX}{suite}/digest") == metrics.get(f"{PREFIX}{suite}/digest")
    if base_value is None or not same:
        why = "no stable baseline" if baseline is None else f"stable has no comparable {suite} results"
        if require_significant and baseline is not None:
            problems.append(f"{why}: cannot show a significant improvement")
        else:
            detail = why
    else:
        bound.append(f"not significantly worse than stable {base_value:.3f} (alpha {alpha:g})")
        try:
            res = compare(per_task(metrics, suite), per_task(baseline or {}, suite), alpha=alpha)
        except ValueError as exc:
            problems.append(f"paired test impossible: {exc}")
        else:
            detail = f"{res.test} p={res.p_value:.3g}: {res.verdict}"
            if res.verdict == "worse":
                problems.append(f"significant regression vs stable ({detail})")
            elif require_significant and res.verdict != "better":
                problems.append(f"no significant improvement over stable ({detail})")
    return ("fail" if problems else "pass", f"{metric}={value:.3f}", ", ".join(bound) or "-",
            "; ".join(problems) or detail)
