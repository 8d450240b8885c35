"""One place that runs an evaluation end to end, for the CLI and the worker alike.

`score_file` judges given completions; `eval_target` generates them first
(journaled per batch to `<out>.completions.jsonl`, so a killed run regenerates
nothing it already made) and then scores them; `compare` puts two results of
the same suite side by side with the paired test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from uff_port.eval.runner import Sample, evaluate, read_samples
from uff_port.eval.sandbox import Sandbox
from uff_port.eval.scoring import Scorer
from uff_port.eval.stats import compare as paired_compare
from uff_port.eval.suites import Suite

Progress = Callable[[str, int, int], None]


def default_out(suite: Suite, target: str | None) -> Path:
    """`TARGET/eval/<suite>.json` for a run or model directory, else `./eval/<suite>.json`."""
    if target and Path(target).is_dir() and os.access(target, os.W_OK):
        return Path(target) / "eval" / f"{suite.name}.json"
    return Path("eval") / f"{suite.name}.json"


def score_file(suite: Suite, samples_path: Path, sandbox: Sandbox, out: Path | None,
               ks: Sequence[int], scorers: Sequence[Scorer] = (),
               progress: Progress | None = None) -> dict[str, Any]:
    samples = read_samples(samples_path, suite)
    meta = {"target": None, "samples_file": str(samples_path)}
    return evaluate(suite, samples, sandbox, out, ks, scorers, meta,
                    (lambda d, t: progress("execute", d, t)) if progress else None)


def _completions_journal(path: Path, header: dict[str, Any]) -> dict[tuple[str, int], str]:
    """Completions already generated under the same header; a fresh journal otherwise."""
    done: dict[tuple[str, int], str] = {}
    if path.exists():
        lines = path.read_bytes().split(b"\n")
        try:
            same = json.loads(lines[0]) == header
        except ValueError:
            same = False
        if same:
            for raw in lines[1:]:
                try:
                    rec = json.loads(raw)
                    done[(rec["task_id"], rec["sample"])] = rec["completion"]
                except (ValueError, KeyError, TypeError):
                    continue
            data = b"\n".join(lines)
            if not data.endswith(b"\n"):
                with open(path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
            return done
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(header, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return done


def eval_target(target: str, suite: Suite, gen: Any, sandbox: Sandbox, out: Path,
                ks: Sequence[int], scorers: Sequence[Scorer] = (), device: str = "cpu",
                base_model: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    from uff_port.eval import generate as g

    tgt = g.resolve_target(target, base_model)
    header = {"kind": "header", "suite_digest": suite.digest, "gen": gen.digest(), **tgt.describe()}
    journal_path = out.with_suffix(".completions.jsonl")
    done = _completions_journal(journal_path, header)
    tasks = list(suite.tasks)
    per = 1 if gen.temperature == 0.0 else gen.n
    total = len(tasks) * per
    made = [sum(1 for t in tasks for i in range(per) if (t.task_id, i) in done)]
    if progress:
        progress("generate", made[0], total)
    if made[0] < total:
        model, tok = g.load(tgt, device)
        with open(journal_path, "ab") as fh:

            def on_batch(rows: list[tuple[int, int, str]]) -> None:
                for p, i, comp in rows:
                    rec = {"task_id": tasks[p].task_id, "sample": i, "completion": comp}
                    fh.write(json.dumps(rec, sort_keys=True).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                made[0] += len(rows)
                if progress:
                    progress("generate", made[0], total)

            comps = g.generate(model, tok, [t.prompt for t in tasks], gen, device,
                               skip=lambda p, i: done.get((tasks[p].task_id, i)), on_batch=on_batch)
        del model
    else:
        comps = [[done[(t.task_id, i)] for i in range(per)] for t in tasks]
        if per == 1:
            comps = [row * gen.n for row in comps]
    samples = [Sample(t.task_id, i, c) for t, row in zip(tasks, comps, strict=True)
               for i, c in enumerate(row)]
    meta = {**tgt.describe(), "generation": {**gen.__dict__, "stop": list(gen.stop)}}
    return evaluate(suite, samples, sandbox, out, ks, scorers, meta,
                    (lambda d, t: progress("execute", d, t)) if progress else None)


def compare_results(a: dict[str, Any], b: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """Candidate `a` against baseline `b`: per-domain pass@1 and the paired test over tasks."""
    if a.get("suite_digest") != b.get("suite_digest"):
        raise ValueError("compare: the results are of different suites (suite_digest differs)")
    test = paired_compare(a["per_task"], b["per_task"], alpha=alpha)
    rows = []
    for key in ("by_manager", "by_stage"):
        for group in sorted(set(a[key]) | set(b[key])):
            ra, rb = a[key].get(group, {}), b[key].get(group, {})
            rows.append({"group": f"{key[3:]}:{group}", "tasks": ra.get("tasks", rb.get("tasks", 0)),
                         "candidate": ra.get("pass@1"), "baseline": rb.get("pass@1")})
    return {"suite": a["suite"], "candidate": a.get("target"), "baseline": b.get("target"),
            "metrics": {"candidate": a["metrics"], "baseline": b["metrics"]},
            "groups": rows, "test": test.to_dict()}
