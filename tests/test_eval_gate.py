"""Suite results in artifact manifests, and the code-evaluation gate with its paired test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from uff_port.eval.metrics import flatten, gate, per_task
from uff_port.eval.runner import Sample, evaluate
from uff_port.eval.sandbox import Sandbox
from uff_port.eval.suites import load_suite
from uff_port.registry.gates import GatesConfig, run_gates
from uff_port.registry.manifest import parse_manifest
from uff_port.registry.runmanifest import write_run_manifest


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """Real results of the components suite: all canonical, all wrong, and half and half."""
    suite = load_suite("components")
    wrong = "    return None\n"
    plans = {
        "good": [t.canonical_solution or "" for t in suite.tasks],
        "bad": [wrong for _ in suite.tasks],
        "half": [t.canonical_solution if i % 2 else wrong for i, t in enumerate(suite.tasks)],
    }
    out = {}
    with Sandbox() as sb:
        for name, comps in plans.items():
            samples = [Sample(t.task_id, 0, c or "") for t, c in zip(suite.tasks, comps, strict=True)]
            out[name] = evaluate(suite, samples, sb, None, ks=[1])
    return out


def test_results_flatten_into_manifest_metrics(tmp_path: Path, results: dict[str, dict[str, Any]]) -> None:
    m = flatten(results["half"])
    assert m["eval/components/pass@1"] == 0.5
    assert m["eval/components/ufm/pass@1"] == 0.5
    assert per_task(m, "components") == results["half"]["per_task"]
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "eval").mkdir()
    (run / "eval" / "components.json").write_text(json.dumps(results["good"]))
    (run / "eval" / "notes.json").write_text("{not a result")
    manifest = parse_manifest(json.loads(write_run_manifest(run).read_text()))
    assert manifest.metrics["eval/components/pass@1"] == 1.0
    assert manifest.metrics["eval/components/task/uam/is_allowed"] == 1.0


def _manifest(tmp_path: Path, name: str, res: dict[str, Any]) -> Any:
    run = tmp_path / name
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_model.safetensors").write_bytes(name.encode())
    (run / "eval").mkdir()
    (run / "eval" / "components.json").write_text(json.dumps(res))
    return parse_manifest(json.loads(write_run_manifest(run).read_text()))


def test_code_eval_gate_in_run_gates(tmp_path: Path, results: dict[str, dict[str, Any]]) -> None:
    good, bad = _manifest(tmp_path, "good", results["good"]), _manifest(tmp_path, "bad", results["bad"])
    cfg = GatesConfig.model_validate({"quality": {"enabled": False}, "latency": {"enabled": False},
                                      "safety": {"enabled": False}, "compatibility": {"enabled": False},
                                      "code_eval": {"enabled": True, "suite": "components", "alpha": 0.05}})
    rows = {g.gate: g for g in run_gates(cfg, good, bad, None)}
    assert rows["code_eval"].status == "pass" and "better" in rows["code_eval"].detail
    rows = {g.gate: g for g in run_gates(cfg, bad, good, None)}
    assert rows["code_eval"].status == "fail" and "significant regression" in rows["code_eval"].detail
    assert run_gates(cfg, good, None, None)[-1].detail == "no stable baseline"
    assert "code_eval" not in {g.gate for g in run_gates(GatesConfig(), good, None, None)}


def test_gate_thresholds_and_significance(results: dict[str, dict[str, Any]]) -> None:
    good, bad, half = (flatten(results[k]) for k in ("good", "bad", "half"))
    assert gate(half, None, "components", threshold=0.6)[0] == "fail"
    assert gate(half, None, "components", threshold=0.5)[0] == "pass"
    status, _, _, detail = gate({}, None, "components")
    assert status == "fail" and "no metrics.eval/components/pass@1" in detail
    # same tasks, indistinguishable: passes, unless a significant improvement is required
    assert gate(half, half, "components")[0] == "pass"
    status, _, _, detail = gate(half, half, "components", require_significant=True)
    assert status == "fail" and "no significant improvement" in detail
    # 12 tasks: good vs bad is 12 discordant pairs, p = 2 / 4096
    assert gate(good, bad, "components", require_significant=True)[0] == "pass"
    # good vs half: 6 discordant pairs, p = 0.03125 < 0.05; at alpha 0.01 it is not significant
    assert gate(half, good, "components", alpha=0.05)[0] == "fail"
    assert gate(half, good, "components", alpha=0.01)[0] == "pass"
    # a baseline evaluated on another suite version cannot be paired
    other = {**bad, "eval/components/digest": 1.0}
    status, _, _, detail = gate(good, other, "components", require_significant=True)
    assert status == "fail" and "no comparable components results" in detail
