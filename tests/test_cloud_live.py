"""Progress from home while a cloud session runs: the entry echoes a few fields of its events
into the session's log, and the runner reads them from the provider's log service (SageMaker:
CloudWatch Logs, here the fake's stream of the real container's stdout)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from uff_port.cloud.backends.sagemaker import SageMakerBackend
from uff_port.cloud.entry import LIVE_PREFIX, LiveEcho, parse_live_line
from uff_port.cloud.fakes import FakeLogs, FakeS3, FakeSageMakerClient
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.core.config import validate_config
from uff_port.training.builtin import ensure_tiny_llama

SM = {"bucket": "uff-test", "role_arn": "arn:aws:iam::000000000000:role/uff", "image_uri": "img:1", "region": "us-east-1"}


def test_the_echo_sends_only_listed_fields_and_waits_for_whole_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    secret = "AKIA" + "X" * 16
    events.write_text(
        json.dumps({"event": "progress", "step": 1, "loss": 2.5, "lr": 0.1, "message": secret}) + "\n"
        + json.dumps({"event": "log", "step": 1, "message": secret}) + "\n"
        + '{"event": "progress", "step": 2, "lo'  # the trainer is mid-write
    )
    out = io.StringIO()
    echo = LiveEcho(events, 0, out)
    assert echo.poll() == 1
    with open(events, "a") as fh:
        fh.write('ss": 2.25}\n')
    assert echo.poll() == 1
    lines = out.getvalue().splitlines()
    assert secret not in out.getvalue() and all(line.startswith(LIVE_PREFIX) for line in lines)
    assert [parse_live_line(line) for line in lines] == [
        {"event": "progress", "step": 1, "loss": 2.5, "lr": 0.1},
        {"event": "progress", "step": 2, "loss": 2.25},
    ]


@given(st.text(max_size=300))
def test_parse_live_line_takes_any_log_line(line: str) -> None:
    ev = parse_live_line(line)
    assert ev is None or (ev["event"] in ("progress", "eval", "checkpoint") and isinstance(ev["step"], int))


def test_a_forged_line_carries_nothing_but_listed_numbers() -> None:
    forged = LIVE_PREFIX + json.dumps({"event": "progress", "step": 3, "loss": 1.0, "path": "/etc/shadow", "lr": True})
    assert parse_live_line("2026-11-30 INFO " + forged) == {"event": "progress", "step": 3, "loss": 1.0}
    assert parse_live_line(LIVE_PREFIX + json.dumps({"event": "failed", "step": 3})) is None
    assert parse_live_line(LIVE_PREFIX + json.dumps({"event": "progress", "step": "3"})) is None


def test_a_sagemaker_session_shows_its_progress_before_it_comes_home(tmp_path: Path, wheel: Path) -> None:
    s3 = FakeS3(tmp_path / "fake" / "s3")
    sm = FakeSageMakerClient(tmp_path / "fake" / "sagemaker", s3)
    sm.kaggle_like.set_faults(sm_real=True)
    logs = FakeLogs(tmp_path / "fake" / "sagemaker")
    cfg = validate_config({
        "model": {"name_or_path": str(ensure_tiny_llama()), "local_files_only": True},
        "data": {"path": "builtin:sample-corpus", "seq_len": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # Steps of ~20 ms: enough of them that polls every 0.3 s see the session running.
        "training": {"max_steps": 48, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "device": "cpu",
                     "precision": "fp32", "progress_every_seconds": 0},
        "checkpoint": {"every_steps": 24, "keep_last": 2},
        "eval": {"every_steps": 24, "max_batches": 1},
        "output": {"plot": False},
        "strategy": "sagemaker",
        "cloud": {"sagemaker": {**SM, "max_runtime_seconds": 3600}, "poll": {"interval_seconds": 0.3}},
    })
    settings = validate_cloud(cfg.cloud)
    run_dir = tmp_path / "runs" / "live"
    run_dir.mkdir(parents=True)
    events: list[tuple[str, dict[str, Any]]] = []
    run = CloudRun(
        run_dir, cfg, settings, run_id="live",
        backend_factory=lambda _n: SageMakerBackend(sm, s3, settings.sagemaker, "live", logs=logs),
        ledger=QuotaLedger(tmp_path / "runs" / ".ledger", settings.budgets),
        emit=lambda ev, **f: events.append((ev, f)),
        sleep=lambda s: time.sleep(min(s, 0.3)),
    )
    assert run.run() == 0, [e for e in events if e[0] in ("failed", "cloud_status")][-3:]
    names = [e for e, _ in events]
    live = [f for e, f in events if e == "progress" and f.get("source") == "cloud_live"]
    assert live, names
    # Seen while the session ran: before its output was pulled home.
    assert names.index("progress") < names.index("cloud_pulled")
    steps = [f["step"] for f in live]
    assert steps == sorted(set(steps)) and all(isinstance(f["loss"], float) for f in live)
    assert all(f["session"] == run.journal.data.sessions[0].name for f in live)
    assert any(e == "eval" and f.get("source") == "cloud_live" for e, f in events)
    # The run's own record is the merged session events, not the live copies.
    merged = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert not any(e.get("source") == "cloud_live" for e in merged)
    assert max(e["step"] for e in merged if e["event"] == "progress") == 48
