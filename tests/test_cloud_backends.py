"""Cloud backends against provider fakes: SageMaker on moto S3, Kaggle's API object, outages, crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto import mock_aws

from uff_port.cloud.backends.base import ProviderUnavailable, SessionSpec
from uff_port.cloud.backends.kaggle import KaggleBackend, kernel_metadata
from uff_port.cloud.backends.sagemaker import SageMakerBackend, classify, job_name, map_status
from uff_port.cloud.bundle import build_bundle
from uff_port.cloud.fakes import FakeKaggleApi, FakeS3, FakeSageMakerClient
from uff_port.cloud.journal import Journal
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.cloud.verify import check_pull
from uff_port.core.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
SM = {"bucket": "uff-test", "role_arn": "arn:aws:iam::000000000000:role/uff", "image_uri": "img:1", "region": "us-east-1"}


class FakeClock:
    def __init__(self, t: float = 1_795_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def _spec(tmp_path: Path, wheel: Path, index: int = 0, max_steps: int = 10) -> SessionSpec:
    bundle = tmp_path / f"bundle{index}"
    build_bundle(bundle, {"training": {"max_steps": max_steps}}, run_id="run-a", session=f"s{index}", wheel=wheel)
    return SessionSpec("run-a", job_name("run-a", index), index, bundle, 3600.0, 60.0)


# ---- SageMaker ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("primary", "secondary", "reason", "state"),
    [
        ("InProgress", "Starting", "", "queued"),
        ("InProgress", "Training", "", "running"),
        ("InProgress", "Interrupted", "", "running"),  # managed spot restarts it itself
        ("Completed", "Completed", "", "completed"),
        ("Failed", "Failed", "AlgorithmError: boom", "failed"),
        ("Stopped", "Stopped", "", "stopped"),
        ("Stopped", "MaxRuntimeExceeded", "", "interrupted"),
        ("Stopped", "MaxWaitTimeExceeded", "", "interrupted"),
        ("Stopping", "Stopping", "", "running"),
    ],
)
def test_sagemaker_status_mapping(primary: str, secondary: str, reason: str, state: str) -> None:
    st = map_status({"TrainingJobStatus": primary, "SecondaryStatus": secondary, "FailureReason": reason})
    assert st.state == state and primary in st.detail


def test_sagemaker_unreachable_is_not_failed() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert isinstance(classify(EndpointConnectionError(endpoint_url="https://x")), ProviderUnavailable)
    throttled = ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}}, "DescribeTrainingJob")
    assert isinstance(classify(throttled), ProviderUnavailable)
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CreateTrainingJob")
    assert not isinstance(classify(denied), ProviderUnavailable)


def test_sagemaker_idempotent_submit_spot_checkpoints_and_verified_pull(tmp_path: Path, wheel: Path) -> None:
    clock = FakeClock()
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="uff-test")
        sm = FakeSageMakerClient(tmp_path / "sm", s3, clock)  # type: ignore[arg-type]
        settings = validate_cloud({"sagemaker": SM})
        backend = SageMakerBackend(sm, s3, settings.sagemaker, "run-a")
        spec = _spec(tmp_path, wheel)
        req = backend.request(spec, "s3://uff-test/x/")
        assert req["CheckpointConfig"] == {"S3Uri": backend.checkpoint_uri, "LocalPath": "/opt/ml/checkpoints"}
        assert req["EnableManagedSpotTraining"] is True
        assert req["StoppingCondition"]["MaxWaitTimeInSeconds"] >= req["StoppingCondition"]["MaxRuntimeInSeconds"] == 3600
        assert len(spec.name) <= 63 and spec.name == job_name("run-a", 0)
        assert backend.find(spec) is None
        assert backend.submit(spec) == spec.name
        # A restarted worker that lost its journal write submits again: same job.
        assert backend.find(spec) == spec.name
        assert backend.submit(spec) == spec.name
        assert sm.creations() == [spec.name]
        assert backend.status(spec.name).state == "running"
        clock.sleep(5)
        st = backend.status(spec.name)
        assert st.state == "completed" and st.billed_seconds is not None
        dest = tmp_path / "pull"
        backend.pull(spec.name, dest)
        assert check_pull(dest).ok
        assert (dest.with_name("pull.s3-checkpoints") / "run" / "checkpoints" / "step-00000005").is_dir()


def _runner(tmp_path: Path, clock: FakeClock, sm: Any, s3: Any, cfg_extra: dict[str, Any]) -> tuple[CloudRun, list[tuple[str, dict[str, Any]]]]:
    cloud = {"sagemaker": {**SM, "max_runtime_seconds": 3600}, "poll": {"interval_seconds": 30, "max_backoff_seconds": 300}}
    cfg = validate_config({"strategy": "sagemaker", "training": {"max_steps": 10}, "cloud": cloud, **cfg_extra})
    settings = validate_cloud(cfg.cloud)
    events: list[tuple[str, dict[str, Any]]] = []
    run_dir = tmp_path / "runs" / "run-a"
    run_dir.mkdir(parents=True)
    run = CloudRun(
        run_dir,
        cfg,
        settings,
        run_id="run-a",
        backend_factory=lambda name: SageMakerBackend(sm, s3, settings.sagemaker, "run-a"),
        ledger=QuotaLedger(tmp_path / "runs" / ".ledger", settings.budgets),
        emit=lambda ev, **f: events.append((ev, f)),
        clock=clock,
        sleep=clock.sleep,
    )
    return run, events


def test_thirty_minute_outage_backs_off_and_never_resubmits(tmp_path: Path, wheel: Path) -> None:
    clock = FakeClock()
    s3 = FakeS3(tmp_path / "s3")
    sm = FakeSageMakerClient(tmp_path / "sm", s3, clock)
    # Jobs run 600 s; the provider is unreachable for 30 minutes starting 60 s in.
    sm.kaggle_like.set_faults(
        sm_script=[[600.0, "InProgress", "Training"], [0.0, "Completed", "Completed"]],
        sm_steps=5,
        outage=[clock.t + 60, clock.t + 60 + 1800],
    )
    run, events = _runner(tmp_path, clock, sm, s3, {})
    assert run.run() == 0
    names = [e for e, _ in events]
    assert "failed" not in names
    down = [f for e, f in events if e == "cloud_status" and f.get("reachable") is False]
    up = [f for e, f in events if e == "cloud_status" and f.get("reachable") is True]
    assert len(down) == 1 and up and up[0]["outage_seconds"] >= 1800
    creations = sm.creations()
    assert len(creations) == len(set(creations)) == 2  # two chained sessions, none twice
    calls_in_outage = sm.kaggle_like.calls.count("sagemaker")
    assert calls_in_outage < 60  # back-off, not a tight loop (1800 s / 30 s would be 60)
    assert (run.run_dir / "final" / "adapter_model.safetensors").is_file()
    assert Journal.load(run.run_dir).data.finished  # type: ignore[union-attr]
    ledger = QuotaLedger(tmp_path / "runs" / ".ledger")
    assert ledger.used_seconds("sagemaker", clock.t) == pytest.approx(1200, abs=1)


def test_spot_interruption_and_flaky_describe_resume_from_s3_checkpoints(tmp_path: Path, wheel: Path) -> None:
    clock = FakeClock()
    s3 = FakeS3(tmp_path / "s3")
    sm = FakeSageMakerClient(tmp_path / "sm", s3, clock)
    sm.kaggle_like.set_faults(
        sm_script=[[100.0, "InProgress", "Training"], [50.0, "InProgress", "Interrupted"], [0.0, "Stopped", "MaxWaitTimeExceeded"]],
        sm_steps=4,
        describe_errors=3,
    )
    run, events = _runner(tmp_path, clock, sm, s3, {})
    assert run.run() == 0
    states = [f.get("state") for e, f in events if e == "cloud_status" and "state" in f]
    assert "interrupted" in states
    steps = [f["step"] for e, f in events if e == "cloud_verified"]
    assert steps == [4, 8, 10]  # each session resumed from the previous one's checkpoint


def test_kaggle_kernel_metadata_script_and_paged_pull(tmp_path: Path, wheel: Path) -> None:
    api = FakeKaggleApi(tmp_path / "k")
    backend = KaggleBackend(api, validate_cloud({}).kaggle, "run-a", tmp_path / "work", sleep=lambda s: None)
    meta = kernel_metadata(backend.kernel_ref, backend.dataset_ref)
    assert meta["is_private"] is True and meta["enable_gpu"] is True and meta["enable_internet"] is False
    assert meta["dataset_sources"] == [backend.dataset_ref]
    spec = _spec(tmp_path, wheel)
    compile(backend.script(spec), "uff_session.py", "exec")
    assert f"SESSION = {spec.name!r}" in backend.script(spec)
    # A kernel that writes seven files; the pull must page through all of them.
    folder = tmp_path / "kfolder"
    folder.mkdir()
    (folder / "uff_session.py").write_text(
        "import os\nfor i in range(7):\n    os.makedirs('d', exist_ok=True)\n    open(f'd/f{i}.txt', 'w').write(str(i))\n"
    )
    (folder / "kernel-metadata.json").write_text(json.dumps({**meta, "dataset_sources": []}))
    assert api.kernels_push(str(folder)).error is None
    while backend.status(backend.kernel_ref).state == "running":
        pass
    assert backend.status(backend.kernel_ref).state == "completed"
    api.set_faults(page_size=2, status_errors=1)
    with pytest.raises(ProviderUnavailable):
        backend.status(backend.kernel_ref)
    backend.pull(backend.kernel_ref, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "d").iterdir()) == [f"f{i}.txt" for i in range(7)]
    assert api.calls.count("kernels_output") == 4
    api.set_faults(old_status_format=True)
    assert backend.status(backend.kernel_ref).state == "completed"


# ---- crash recovery through the real cloud job process ----------------------
CRASH_POINTS = [
    "saved:submitting",
    "after_submit",
    "saved:submitted",
    "saved:running",
    "after_record",
    "saved:completed",
    "after_pull",
    "saved:pulled",
    "saved:verified",
]


@pytest.mark.slow
def test_killed_at_every_transition_the_job_resumes_and_never_submits_twice(tmp_path: Path, wheel: Path) -> None:
    fake = tmp_path / "fake"
    FakeKaggleApi(fake / "sagemaker").set_faults(
        sm_script=[[0.3, "InProgress", "Training"], [0.0, "Completed", "Completed"]], sm_steps=5
    )
    env = {**os.environ, "UFF_PORT_CLOUD_FAKE": str(fake), "UFF_PORT_WHEEL": str(wheel)}
    for point in CRASH_POINTS:
        run_dir = tmp_path / "runs" / point.replace(":", "-")
        run_dir.mkdir(parents=True)
        cfg = {
            "strategy": "sagemaker",
            "training": {"max_steps": 10},
            "cloud": {"sagemaker": SM, "poll": {"interval_seconds": 0.05}, "safety_margin_seconds": 0},
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "uff_port.cloud", "run", "--run-dir", str(run_dir)]
        crashed = subprocess.run(cmd, env={**env, "UFF_PORT_CLOUD_CRASH_AT": point}, capture_output=True, timeout=60)
        assert crashed.returncode == 137, (point, crashed.stderr[-2000:])
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, (point, done.stderr[-2000:])
        journal = Journal.load(run_dir)
        assert journal is not None and journal.data.finished and journal.data.final_step == 10
        names = [s.name for s in journal.data.sessions]
        assert names == [job_name(run_dir.name, 0), job_name(run_dir.name, 1)], point
        created = [c for c in FakeSageMakerClient(fake / "sagemaker", FakeS3(fake / "s3")).creations() if c in names]
        assert created == names, point  # each session submitted exactly once
        uses = [json.loads(line) for line in (tmp_path / "runs" / ".cloud-ledger.jsonl").read_text().splitlines()]
        keys = [u["key"] for u in uses if u["kind"] == "use" and u["key"].startswith(run_dir.name)]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 2, point
        assert (run_dir / "final" / "adapter_model.safetensors").is_file()


def test_jobs_that_keep_failing_without_progress_fail_the_run(tmp_path: Path, wheel: Path) -> None:
    clock = FakeClock()
    s3 = FakeS3(tmp_path / "s3")
    sm = FakeSageMakerClient(tmp_path / "sm", s3, clock)
    sm.kaggle_like.set_faults(sm_script=[[60.0, "InProgress", "Training"], [0.0, "Failed", "Failed"]], sm_steps=5)
    run, events = _runner(tmp_path, clock, sm, s3, {})
    assert run.run() == 1
    failed = [f for e, f in events if e == "failed"]
    assert len(failed) == 1 and "in a row" in failed[0]["message"]
    assert failed[0]["resumable"] is False  # a supervisor restart would only repeat them
    assert len(sm.creations()) == 3
    assert [s.remote_state for s in run.journal.data.sessions] == ["failed"] * 3


def test_two_hybrid_runs_starting_at_once_take_one_cloud_each(tmp_path: Path, wheel: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Both see SageMaker free (its daily hours go first) while they build their bundles; the
    check and the reservation are one step under the ledger's routing lock, so the second to
    reserve routes again and takes Kaggle instead of a second SageMaker session."""
    import threading

    from uff_port.cloud.factory import make_backend

    monkeypatch.setenv("UFF_PORT_CLOUD_FAKE", str(tmp_path / "fake"))
    cloud = {"sagemaker": SM, "local_gpu": "no", "ledger_path": str(tmp_path / "runs" / ".ledger")}
    cfg = validate_config({"strategy": "hybrid", "training": {"max_steps": 10}, "cloud": cloud})
    settings = validate_cloud(cfg.cloud)
    barrier = threading.Barrier(2)
    runs = []
    for rid in ("run-a", "run-b"):
        run_dir = tmp_path / "runs" / rid
        run_dir.mkdir(parents=True)
        runs.append(CloudRun(run_dir, cfg, settings, run_id=rid,
                             backend_factory=lambda name, d=run_dir, r=rid: make_backend(name, settings, r, d / "work"),
                             ledger=QuotaLedger(settings.ledger_path, settings.budgets), emit=lambda ev, **f: None,
                             sleep=lambda s: None))

    def start(run: CloudRun) -> None:
        barrier.wait()
        for _ in range(3):
            if run.journal.current is None:
                run._start_session()

    threads = [threading.Thread(target=start, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    backends = sorted(r.journal.current.backend for r in runs if r.journal.current is not None)
    assert backends == ["kaggle", "sagemaker"]
    ledger = QuotaLedger(settings.ledger_path, settings.budgets)
    assert sorted(u.backend for u in ledger.usages()) == ["kaggle", "sagemaker"]
