"""Real remote sessions on CPU: the generated Kaggle kernel and the SageMaker entry point.

The tiny model is trained for real, across sessions cut off by their runtime
budget (and by a SageMaker SIGTERM), and the result must equal one local run:
the same loss at every step and the same final adapter bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from uff_port.cloud.backends.kaggle import KaggleBackend
from uff_port.cloud.fakes import FakeKaggleApi
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.cloud.verify import check_pull
from uff_port.core.config import validate_config
from uff_port.hashing import sha256_file

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
    "data": {"path": "builtin:sample-corpus", "seq_len": 256},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {
        # Heavy enough steps (~0.25 s on 2 busy cores) that a session of a few
        # seconds is cut off well before max_steps however fast the machine is.
        "max_steps": 40,
        "micro_batch_size": 4,
        "grad_accum_steps": 4,
        "warmup_steps": 2,
        "device": "cpu",
        "precision": "fp32",
        "progress_every_seconds": 0,
        "learning_rate": 0.003,
    },
    "checkpoint": {"every_steps": 4, "keep_last": 2},
    "eval": {"every_steps": None, "max_batches": 1},
    "output": {"plot": False},
}


def _losses(events_files: list[Path]) -> dict[int, float]:
    out: dict[int, float] = {}
    for path in events_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            ev = json.loads(line)
            if ev.get("event") == "progress":
                out[int(ev["step"])] = ev["loss"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted local run of the same config."""
    root = tmp_path_factory.mktemp("ref")
    (root / "config.yaml").write_text(yaml.safe_dump(TINY))
    proc = subprocess.run(
        [sys.executable, "-m", "uff_port.training", "--run-dir", str(root / "run"), "--config", str(root / "config.yaml")],
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "losses": _losses([root / "run" / "events.jsonl"]),
        "adapter": sha256_file(root / "run" / "final" / "adapter_model.safetensors"),
    }


def _same_training(reference: dict[str, Any], losses: dict[int, float], adapter: Path) -> None:
    assert sorted(losses) == sorted(reference["losses"])
    for step, loss in reference["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    assert sha256_file(adapter) == reference["adapter"]


def test_kaggle_kernel_two_sessions_equal_one_local_run(tmp_path: Path, wheel: Path, reference: dict[str, Any]) -> None:
    """Session 1 gets only the 14 s left of the week's quota and is cut off; the
    run waits for the reset (a fake week jump), session 2 finishes. The first
    download is tampered with and must be refused, then pulled again."""
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    def sleep(seconds: float) -> None:
        if seconds > 60:
            offset[0] += seconds  # waiting for the quota reset: jump
        else:
            time.sleep(min(seconds, 0.3))

    cloud = {
        "kaggle": {"session_hours": 120 / 3600},
        "budgets": {"kaggle_hours_per_week": 0.5, "min_session_minutes": 0.2},
        "safety_margin_seconds": 5,
        "poll": {"interval_seconds": 0.3, "max_backoff_seconds": 8 * 86400},
    }
    cfg = validate_config({**TINY, "strategy": "kaggle", "cloud": cloud})
    settings = validate_cloud(cfg.cloud)
    ledger = QuotaLedger(tmp_path / "runs" / ".ledger", settings.budgets)
    ledger.record("other-run:s0", "kaggle", clock() - 60, 0.5 * 3600 - 14)
    api = FakeKaggleApi(tmp_path / "fake")
    api.set_faults(tamper="alter")
    run_dir = tmp_path / "runs" / "kg"
    run_dir.mkdir(parents=True)
    events: list[tuple[str, dict[str, Any]]] = []
    run = CloudRun(
        run_dir,
        cfg,
        settings,
        run_id="kg",
        backend_factory=lambda name: KaggleBackend(api, settings.kaggle, "kg", run_dir / "cloud" / "work", sleep=sleep),
        ledger=ledger,
        emit=lambda ev, **f: events.append((ev, f)),
        clock=clock,
        sleep=sleep,
    )
    assert run.run() == 0, events[-3:]
    names = [e for e, _ in events]
    assert names.count("cloud_submitted") == 2
    assert "cloud_refused" in names and names.index("cloud_refused") < names.index("cloud_verified")
    waits = [f for e, f in events if e == "quota" and f.get("waiting")]
    assert waits, "session 2 had to wait for the weekly reset"
    first = json.loads((run_dir / "cloud" / "pulls" / run.journal.data.sessions[0].name / "run" / "session.json").read_text())
    assert first["budget_stop"] and not first["finished"]
    pulls = sorted((run_dir / "cloud" / "pulls").iterdir())
    assert all(check_pull(p).ok for p in pulls)
    _same_training(reference, _losses([p / "run" / "events.jsonl" for p in pulls]), run_dir / "final" / "adapter_model.safetensors")
    # Each session's dataset version carried the previous checkpoint inside payload.tar.
    versions = sorted((tmp_path / "fake" / "datasets").glob("*/v*"))
    assert len(versions) == 2 and all((v / "payload.tar").is_file() for v in versions)


def _sm_env(root: Path, hps: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "KAGGLE_"))}
    env.update(
        {
            "UFF_PORT_SM_ROOT": str(root),
            "SM_MODEL_DIR": str(root / "model"),
            "SM_CHANNEL_BUNDLE": str(root / "input" / "data" / "bundle"),
            "SM_HPS": json.dumps(hps),
            "UFF_PORT_KILL_AFTER": "30",
        }
    )
    return env


def test_sagemaker_entry_budget_cut_sigterm_and_resume_equal_one_local_run(
    tmp_path: Path, wheel: Path, reference: dict[str, Any]
) -> None:
    from uff_port.cloud.bundle import build_bundle

    root = tmp_path / "ml"
    build_bundle(root / "input" / "data" / "bundle", {**TINY}, run_id="sm", session="s0", wheel=wheel)
    entry = [sys.executable, "-m", "uff_port.cloud.entry"]
    run_dir = root / "checkpoints" / "run"  # what CheckpointConfig keeps across sessions

    # Session 1: MaxRuntimeInSeconds leaves ~10 s after the margin: cut off by the budget.
    p1 = subprocess.run(entry, env=_sm_env(root, {"uff_max_runtime": "16", "uff_margin": "6", "uff_session": "s0"}), capture_output=True, timeout=120)
    assert p1.returncode == 0, p1.stderr[-3000:]
    s1 = json.loads((run_dir / "session.json").read_text())
    assert s1["budget_stop"] and not s1["finished"]
    assert check_pull(root / "model").ok

    # Session 2: SageMaker stops the job (SIGTERM, then the kill 120 s later).
    p2 = subprocess.Popen(entry, env=_sm_env(root, {"uff_max_runtime": "600", "uff_margin": "5", "uff_session": "s1"}), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p2.poll() is None:
        steps = _losses([run_dir / "events.jsonl"]) if (run_dir / "events.jsonl").exists() else {}
        if steps and max(steps) > max(s1["step"], 1):
            break
        time.sleep(0.2)
    p2.send_signal(signal.SIGTERM)
    _, err = p2.communicate(timeout=60)
    assert p2.returncode == 0, err[-3000:]
    s2 = json.loads((run_dir / "session.json").read_text())
    assert s2["signalled"] and s2["start_step"] == s1["step"]
    assert check_pull(root / "model").ok

    # Session 3: runs to the end; the model dir (model.tar.gz) holds the verified final adapter.
    (root / "model").rename(root / "model-s1")
    p3 = subprocess.run(entry, env=_sm_env(root, {"uff_max_runtime": "600", "uff_margin": "5", "uff_session": "s2"}), capture_output=True, timeout=240)
    assert p3.returncode == 0, p3.stderr[-3000:]
    s3 = json.loads((run_dir / "session.json").read_text())
    assert s3["finished"] and s3["step"] == TINY["training"]["max_steps"]
    assert check_pull(root / "model").ok
    _same_training(reference, _losses([run_dir / "events.jsonl"]), root / "model" / "run" / "final" / "adapter_model.safetensors")
