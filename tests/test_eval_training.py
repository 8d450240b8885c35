"""eval.suites inside a real training run of the tiny model, driven through the worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uff_port.client import WorkerClient

pytestmark = pytest.mark.slow
BASE = {
    "data.seq_len": 64,
    "training.micro_batch_size": 2,
    "training.grad_accum_steps": 1,
    "checkpoint.every_steps": None,
    "training.progress_every_seconds": 0.0,
}


def test_suites_run_at_their_steps_and_reach_the_manifest(worker: WorkerClient, runs_root: Path) -> None:
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": {
        **BASE, "training.max_steps": 4, "eval.every_steps": 2, "eval.max_batches": 1,
        "eval.suites": [{"suite": "ufm", "max_new_tokens": 8, "batch_size": 2}]}})
    worker.wait_event("artifact", timeout=240)
    evals = [e for e in worker.events_named("eval") if e.get("suite")]
    assert [e["step"] for e in evals] == [2, 4]  # at the loss eval's steps; the end is not run twice
    assert all(e["suite"] == "ufm" and e["tasks"] == 2 and "pass@1" in e and set(e["by_manager"]) == {"ufm"}
               for e in evals)
    res = json.loads((runs_root / "job" / "eval" / "ufm.json").read_text())
    assert res["step"] == 4 and res["sandbox"]["isolation"]
    manifest = json.loads((runs_root / "job" / "final" / "artifact.json").read_text())
    assert manifest["metrics"]["eval/ufm/pass@1"] == res["metrics"]["pass@1"]
    assert "eval_loss" in manifest["metrics"]


def test_status_answers_and_stop_abandons_an_eval(worker: WorkerClient, runs_root: Path) -> None:
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": {
        **BASE, "training.max_steps": 400, "eval.every_steps": None,
        "eval.suites": [{"suite": "humaneval", "every_steps": 2, "max_new_tokens": 64, "batch_size": 2}]}})
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("phase") == "evaluating", timeout=180)
    status = worker.request("status", timeout=10)  # the worker's own view: busy, at step 2
    assert status["step"] == 2
    # the stop goes to the trainer, which polls its channel between generation batches
    stopped = worker.request("stop", timeout=60)
    assert stopped["exit_status"] == 75 and stopped["checkpoint"] and stopped["step"] == 2
    logs = [e["message"] for e in worker.events_named("log")]
    assert any("code evaluation abandoned at step 2" in m for m in logs)
    assert not (runs_root / "job" / "eval" / "humaneval.json").exists()


def test_a_shared_eval_path_makes_eval_losses_comparable(tmp_path: Path) -> None:
    """Two runs that split their own data differently evaluate on the same fixed file."""
    import os
    import subprocess
    import sys

    import yaml

    from uff_port.training.builtin import sample_corpus_path

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(sample_corpus_path().read_text().splitlines(keepends=True)[:40]))
    tokens = []
    for name, fraction in (("a", 0.0), ("b", 0.3)):
        cfg = {"model": {"name_or_path": "builtin:tiny-llama"},
               "data": {"path": "builtin:sample-corpus", "seq_len": 64, "eval_fraction": fraction},
               "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "device": "cpu",
                            "precision": "fp32", "progress_every_seconds": 0},
               "checkpoint": {"every_steps": None}, "output": {"plot": False},
               "eval": {"every_steps": 2, "max_batches": 50, "path": str(held_out)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "uff_port.training", "--run-dir", str(tmp_path / name),
                               "--config", str(tmp_path / f"{name}.yaml")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        events = [json.loads(x) for x in (tmp_path / name / "events.jsonl").read_text().splitlines()]
        evals = [e for e in events if e["event"] == "eval" and "suite" not in e]
        assert evals and evals[-1]["loss"] is not None
        tokens.append(evals[-1]["tokens"])
    assert tokens[0] == tokens[1] > 0  # the same held-out tokens, though run a holds out nothing of its own
