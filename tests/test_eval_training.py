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
    status = worker.request("status", timeout=10)  # answered between generation batches
    assert status["step"] == 2
    stopped = worker.request("stop", timeout=60)
    assert stopped["exit_status"] == 75 and stopped["checkpoint"] and stopped["step"] == 2
    logs = [e["message"] for e in worker.events_named("log")]
    assert any("code evaluation abandoned at step 2" in m for m in logs)
    assert not (runs_root / "job" / "eval" / "humaneval.json").exists()
