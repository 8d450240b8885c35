"""The worker's `eval` command: a real worker, its child process, progress events, confinement."""

from __future__ import annotations

import json
from pathlib import Path

from uff_port.client import WorkerClient
from uff_port.eval.suites import load_suite


def test_worker_eval_scores_samples_and_generates_with_progress_events(
    worker: WorkerClient, runs_root: Path
) -> None:
    rows = [{"task_id": t.task_id, "completion": c}
            for t in load_suite("components").tasks for c in (t.canonical_solution, "    return None\n")]
    (runs_root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reply = worker.call("eval", {"suite": "components", "samples": "samples.jsonl", "k": [1, 2],
                                 "scorers": ["parses"], "progress_every_seconds": 0}, timeout=120)
    assert reply["ok"], reply
    res = reply["result"]
    assert res["metrics"] == {"tasks": 12, "pass@1": 0.5, "pass@2": 1.0}
    assert res["results"] == str(runs_root / "eval" / "components.json")
    assert set(res["by_manager"]) == {"ufm", "ucm", "urm", "ulm", "uim", "uam"}
    assert res["sandbox"]["isolation"] in ("bwrap", "unshare", "rlimits")
    progress = worker.events_named("eval_progress")
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 24
    assert worker.events_named("eval_result")[-1]["metrics"] == res["metrics"]

    # generation from the tiny model: a generate phase, then execute
    since = len(worker.events)
    reply = worker.call("eval", {"suite": "components", "target": "builtin:tiny-llama", "limit": 2,
                                 "max_new_tokens": 8, "out": "gen/components.json"}, timeout=240)
    assert reply["ok"], reply
    assert reply["result"]["tasks"] == 2 and (runs_root / "gen" / "components.json").exists()
    phases = {e["phase"] for e in worker.events[since:] if e.get("event") == "eval_progress"}
    assert phases == {"generate", "execute"}

    # bad args name the field; paths stay under the run root
    for args, field in (({"suite": "components"}, "exactly one of samples and target"),
                        ({"suite": "components", "samples": "../../etc/passwd"}, "args.samples"),
                        ({"suite": 3, "samples": "samples.jsonl"}, "args.suite"),
                        ({"suite": "components", "samples": "samples.jsonl", "scorers": ["x.py:f"]},
                         "args.scorers"),
                        ({"suite": "components", "samples": "samples.jsonl", "n": 0}, "args.n")):
        bad = worker.call("eval", args, timeout=60)
        assert not bad["ok"] and bad["error"]["code"] == "invalid_args", bad
        assert field in bad["error"]["message"]
