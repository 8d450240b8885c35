"""Elixir component tasks: compiled and tested with ExUnit inside the sandbox, parsed without running."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uff_port.eval.scoring import load_scorer
from uff_port.eval.suites import SuiteError, load_suite, read_tasks

pytestmark = pytest.mark.skipif(shutil.which("elixirc") is None, reason="Elixir is not installed")
ROOT = Path(__file__).resolve().parents[1]


def test_the_elixir_suite_covers_every_manager_and_judges_by_running_exunit(tmp_path: Path) -> None:
    suite = load_suite("elixir")
    assert {t.manager for t in suite.tasks} == {"ufm", "ucm", "urm", "ulm", "uim", "uam"}
    rows = []
    for t in suite.tasks:
        rows.append({"task_id": t.task_id, "completion": t.canonical_solution})
        rows.append({"task_id": t.task_id, "completion": "    :not_implemented\n  end\nend\n"})  # compiles, fails
        rows.append({"task_id": t.task_id, "completion": "    (\n"})  # does not compile
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "uff_port.cli", "eval", "--suite", "elixir", "--samples",
                           str(samples), "--k", "1", "--scorer", "parses", "--json",
                           "--out", str(tmp_path / "elixir.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    view = json.loads(proc.stdout)
    by_sample: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    for s in view["samples"]:
        by_sample[s["sample"]].append(s)
    assert all(s["passed"] for s in by_sample[0]), [s["reason"] for s in by_sample[0]]
    assert not any(s["passed"] for s in by_sample[1]) and not any(s["passed"] for s in by_sample[2])
    assert all("tests failed" in s["reason"] for s in by_sample[1]), [s["reason"] for s in by_sample[1]]
    assert all("does not compile" in s["reason"] for s in by_sample[2]), [s["reason"] for s in by_sample[2]]
    assert all(s["scores"]["parses"]["score"] == 1.0 for s in by_sample[0] + by_sample[1])
    assert all(s["scores"]["parses"]["score"] == 0.0 for s in by_sample[2])


def test_the_parse_scorer_never_runs_elixir_code(tmp_path: Path) -> None:
    suite = load_suite("elixir")
    marker = tmp_path / "ran"
    evil = f'    File.write!("{marker}", "x")\n  end\nend\nFile.write!("{marker}", "y")\n'
    score, reason = load_scorer("parses")(suite.tasks[0], evil)
    assert score == 1.0 and reason == "parses" and not marker.exists()


def test_an_elixir_task_with_a_python_entry_point_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "s.jsonl"
    bad.write_text(json.dumps({"task_id": "x/1", "prompt": "defmodule X do\n", "tests": "ExUnit.start()\n",
                               "language": "elixir", "entry_point": "check"}) + "\n")
    with pytest.raises(SuiteError, match="s.jsonl:1: entry_point"):
        read_tasks(bad)
    bad.write_text(json.dumps({"task_id": "x/1", "prompt": "x", "tests": "y", "language": "rust"}) + "\n")
    with pytest.raises(SuiteError, match="language: expected one of"):
        read_tasks(bad)
