"""The real worker drives a cloud job (fake providers via UFF_PORT_CLOUD_FAKE), survives its own death."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from uff_port.client import WorkerClient
from uff_port.cloud.backends.sagemaker import job_name
from uff_port.cloud.fakes import FakeKaggleApi, FakeS3, FakeSageMakerClient

pytestmark = pytest.mark.slow

SM = {"bucket": "uff-test", "role_arn": "arn:aws:iam::000000000000:role/uff", "image_uri": "img:1", "region": "us-east-1"}
CONFIG = {
    "name": "cw",
    "strategy": "sagemaker",
    "training": {"max_steps": 10},
    "cloud": {"sagemaker": SM, "poll": {"interval_seconds": 0.1}, "safety_margin_seconds": 0},
}


def test_worker_runs_cloud_job_detaches_on_eof_and_resumes_from_journal(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    FakeKaggleApi(fake / "sagemaker").set_faults(
        sm_script=[[2.0, "InProgress", "Training"], [0.0, "Completed", "Completed"]], sm_steps=5
    )
    wheel = tmp_path / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")
    env = {**os.environ, "UFF_PORT_CLOUD_FAKE": str(fake), "UFF_PORT_WHEEL": str(wheel), "AWS_SECRET_ACCESS_KEY": "awsSECRETabcdefghijklmnop"}
    runs = tmp_path / "runs"
    runs.mkdir()
    sm = FakeSageMakerClient(fake / "sagemaker", FakeS3(fake / "s3"))

    # 1. Start; once the first session is submitted, the worker goes away (EOF).
    with WorkerClient(runs_root=runs, heartbeat_interval=0.2, env=env) as w:
        reply = w.request("train", {"config": CONFIG, "run_dir": "cw"})
        assert reply["run_dir"].endswith("cw")
        w.wait_event("cloud_submitted", timeout=60)
        status = w.request("status")
        assert status.get("state") is not None
        w.close_stdin()
        assert w.wait(60) in (0, 75)
    first = job_name("cw", 0)
    assert sm.creations() == [first]
    job = json.loads((fake / "sagemaker" / "jobs" / f"{first}.json").read_text())
    assert job["stopped"] is None  # EOF never cancels the remote job

    # 2. A new worker, the same `train`: picks the job up from the journal.
    with WorkerClient(runs_root=runs, heartbeat_interval=0.2, env=env) as w:
        w.request("train", {"config": CONFIG, "run_dir": "cw"})
        done = w.wait_event(lambda e: e.get("event") in ("finished", "failed"), timeout=120)
        assert done["event"] == "finished", done
        recovered = [e for e in w.events_named("cloud_submitted") if e.get("recovered")]
        assert not recovered or recovered[0]["session"] == first
        assert [e["step"] for e in w.events_named("cloud_verified")][-1] == 10
        week = w.request("plan_week", {"cloud": {}})
        assert "totals:" in week["text"]
        cs = w.request("cloud_status", {"run_dir": "cw"})
        assert cs["journal"]["finished"] is True
        frames = json.dumps(w.events)
        assert "awsSECRET" not in frames  # credentials never in events
        w.shutdown()
    assert sm.creations() == [first, job_name("cw", 1)]
    assert (runs / "cw" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("strategy", "module", "extra"),
    [("kaggle", "kaggle", "uff-port[cloud-sdks]"), ("sagemaker", "boto3", "uff-port[cloud]")],
)
def test_missing_provider_sdk_fails_for_good_naming_the_package(tmp_path: Path, strategy: str, module: str, extra: str) -> None:
    """No SDK: `not_available`, not resumable (a restart cannot install it), nothing built or reserved."""
    # The provider's package made unimportable for the worker and its children, installed or not.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / f"{module}.py").write_text(f"raise ImportError('{module} is not installed here')\n")
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k not in ("UFF_PORT_CLOUD_FAKE", "UFF_PORT_WHEEL")}
    env["PYTHONPATH"] = path
    runs = tmp_path / "runs"
    runs.mkdir()
    config = {**CONFIG, "name": f"nosdk-{strategy}", "strategy": strategy}
    with WorkerClient(runs_root=runs, heartbeat_interval=0.2, env=env) as w:
        w.request("train", {"config": config, "run_dir": "nosdk"})
        done = w.wait_event(lambda e: e.get("event") in ("finished", "failed"), timeout=60)
        assert done["event"] == "failed", done
        assert done["code"] == "not_available"
        assert done["resumable"] is False
        assert f"pip install '{extra}'" in done["message"]
        idle = w.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30)
        assert idle["outcome"] == "refused"
        assert w.request("status")["last_job"]["outcome"] == "refused"
        assert not w.events_named("quota")  # no quota reserved
        w.shutdown()
    run = runs / "nosdk"
    assert not (run / "cloud").exists()  # no bundle, no journal session: nothing to resume
    assert not (runs / ".cloud-cache").exists()  # and no wheel was built first
    assert not (runs / ".cloud-ledger.jsonl").exists() or not (runs / ".cloud-ledger.jsonl").read_text().strip()
