"""Base weights where the job runs, the Kaggle push as kaggle 2.x takes it, SageMaker data protection.

The real-model path is exercised with the locally built tiny model standing in
for the Kaggle Model copy of DeepSeek-Coder: the config names the Hub id, the
kernel gets the model through `model_sources`, the entry maps the mount onto
`model.name_or_path`, and the pulled artifact passes the default gates.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.cloud.backends.base import ProviderError, SessionSpec
from uff_port.cloud.backends.kaggle import KaggleBackend, kernel_metadata
from uff_port.cloud.backends.sagemaker import SageMakerBackend, job_name
from uff_port.cloud.bundle import build_bundle
from uff_port.cloud.events_merge import merge_events
from uff_port.cloud.fakes import FakeKaggleApi
from uff_port.cloud.fakes.sagemaker import validate_request
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.cloud.weights import WeightsError, plan_weights
from uff_port.core.config import ConfigError, validate_config
from uff_port.core.exits import ExitCode
from uff_port.training.builtin import ensure_tiny_llama

HANDLE = "deepseek-ai/deepseek-coder/transformers/1.3b-base/1"
HUB_ID = "deepseek-ai/deepseek-coder-1.3b-base"
SM = {"bucket": "uff-test", "role_arn": "arn:aws:iam::000000000000:role/uff", "image_uri": "img:1", "region": "us-east-1"}
KMS = "arn:aws:kms:us-east-1:000000000000:key/11111111-2222-3333-4444-555555555555"
SHORT: dict[str, Any] = {
    "data": {"path": "builtin:sample-corpus", "seq_len": 64},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "device": "cpu",
                 "precision": "fp32", "progress_every_seconds": 0},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "eval": {"every_steps": 2, "max_batches": 1},
    "output": {"plot": False},
}


# ---- the push, as the real client takes it ----------------------------------
def test_fake_kaggle_methods_have_the_real_clients_signatures() -> None:
    kaggle_api = pytest.importorskip("kaggle.api.kaggle_api_extended")
    for name in ("kernels_push", "kernels_status", "kernels_output", "kernels_pull", "dataset_create_new",
                 "dataset_create_version", "dataset_status", "get_config_value", "authenticate"):
        real = [p for p in inspect.signature(getattr(kaggle_api.KaggleApi, name)).parameters if p != "self"]
        fake = [p for p in inspect.signature(getattr(FakeKaggleApi, name)).parameters if p != "self"]
        assert fake == real, name


def test_accelerator_goes_as_acc_and_machine_shape(tmp_path: Path) -> None:
    api = FakeKaggleApi(tmp_path / "k")
    settings = validate_cloud({"kaggle": {"model_source": HANDLE}})
    backend = KaggleBackend(api, settings.kaggle, "run-a", tmp_path / "work", sleep=lambda s: None)
    spec = SessionSpec("run-a", "s0", 0, tmp_path, 3600.0, 60.0)
    assert backend.push_kwargs(spec) == {"timeout": "3600", "acc": "NvidiaTeslaT4"}
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        inspect.signature(KaggleApi.kernels_push).bind(None, "folder", **backend.push_kwargs(spec))
    except ImportError:
        pass
    meta = kernel_metadata(backend.kernel_ref, backend.dataset_ref, settings.kaggle,
                           weights={"kind": "kaggle_model", "source": HANDLE})
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["model_sources"] == [HANDLE]
    assert meta["enable_internet"] is False
    assert kernel_metadata("u/k-1", "u/d-1", validate_cloud({"kaggle": {"internet": True}}).kaggle)["enable_internet"] is True
    with pytest.raises(ConfigError, match="cloud.kaggle.accelerator: NvidiaTeslaP100 is retired"):
        validate_cloud({"kaggle": {"accelerator": "NvidiaTeslaP100"}})
    with pytest.raises(ConfigError, match="cloud.kaggle.model_source"):
        validate_cloud({"kaggle": {"model_source": "deepseek-ai/deepseek-coder"}})


# ---- the plan: what to attach -------------------------------------------------
def test_weights_plan_names_exactly_what_to_attach(tmp_path: Path) -> None:
    cfg = {"model": {"name_or_path": HUB_ID}}
    with pytest.raises(WeightsError, match=r"set cloud.kaggle.model_source .*deepseek-ai/deepseek-coder/transformers"):
        plan_weights(cfg, validate_cloud({}), "kaggle")
    assert plan_weights(cfg, validate_cloud({"kaggle": {"model_source": HANDLE}}), "kaggle").kind == "kaggle_model"
    assert plan_weights(cfg, validate_cloud({"kaggle": {"internet": True}}), "kaggle").kind == "hub"
    assert plan_weights(cfg, validate_cloud({"sagemaker": SM}), "sagemaker").kind == "hub"
    with pytest.raises(WeightsError, match="network_isolation blocks the Hub"):
        plan_weights(cfg, validate_cloud({"sagemaker": {**SM, "network_isolation": True}}), "sagemaker")
    on_s3 = plan_weights(cfg, validate_cloud({"sagemaker": {**SM, "network_isolation": True,
                                                              "model_s3_uri": "s3://uff-weights/deepseek"}}), "sagemaker")
    assert (on_s3.kind, on_s3.source) == ("s3", "s3://uff-weights/deepseek/")
    local = plan_weights({"model": {"name_or_path": str(ensure_tiny_llama())}}, validate_cloud({}), "kaggle",
                         cache=tmp_path / "hashes.json")
    assert local.kind == "kaggle_dataset" and local.content_hash and len(local.content_hash) == 64
    assert "local_dir" not in local.to_meta()  # never a local path in the bundle


def _kaggle_run(tmp_path: Path, api: FakeKaggleApi, name: str, cfg_raw: dict[str, Any]) -> tuple[CloudRun, list[tuple[str, dict[str, Any]]]]:
    cloud = {"poll": {"interval_seconds": 0.2}, "safety_margin_seconds": 5, "kaggle": {"session_hours": 0.5},
             **cfg_raw.pop("cloud", {})}
    cfg = validate_config({**SHORT, "strategy": "kaggle", "cloud": cloud, **cfg_raw})
    settings = validate_cloud(cfg.cloud)
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    events: list[tuple[str, dict[str, Any]]] = []
    run = CloudRun(
        run_dir, cfg, settings, run_id=name,
        backend_factory=lambda _n: KaggleBackend(api, settings.kaggle, name, run_dir / "cloud" / "work", sleep=lambda s: None),
        ledger=QuotaLedger(tmp_path / "runs" / ".ledger", settings.budgets),
        emit=lambda ev, **f: events.append((ev, f)),
        sleep=lambda s: time.sleep(min(s, 0.2)),
    )
    return run, events


def test_a_hub_id_on_offline_kaggle_fails_before_anything_is_uploaded(tmp_path: Path, wheel: Path) -> None:
    api = FakeKaggleApi(tmp_path / "fake")
    run, events = _kaggle_run(tmp_path, api, "hub", {"model": {"name_or_path": HUB_ID}})
    assert run.run() == ExitCode.REFUSED
    failed = [f for e, f in events if e == "failed"]
    assert failed[0]["code"] == "model_not_found" and "cloud.kaggle.model_source" in failed[0]["message"]
    assert failed[0]["resumable"] is False
    assert api.uploads() == [] and "kernels_push" not in api.calls


def test_the_fake_refuses_a_kernel_whose_model_source_does_not_exist(tmp_path: Path, wheel: Path) -> None:
    api = FakeKaggleApi(tmp_path / "fake")
    settings = validate_cloud({"kaggle": {"model_source": HANDLE}})
    backend = KaggleBackend(api, settings.kaggle, "run-a", tmp_path / "work", sleep=lambda s: None)
    bundle = tmp_path / "bundle"
    build_bundle(bundle, {"training": {"max_steps": 2}}, run_id="run-a", session="s0", wheel=wheel)
    spec = SessionSpec("run-a", "s0", 0, bundle, 600.0, 5.0, {"weights": {"kind": "kaggle_model", "source": HANDLE}})
    with pytest.raises(ProviderError, match=f"not found or not accessible: {HANDLE}"):
        backend.submit(spec)


def test_a_session_without_its_weights_sends_home_what_to_attach(tmp_path: Path, wheel: Path) -> None:
    """The kernel's inputs lack the model (a model source removed after planning): the entry says which."""
    root = tmp_path / "kaggle"
    (root / "working").mkdir(parents=True)
    model = {"kind": "kaggle_model", "name": HUB_ID, "source": HANDLE, "content_hash": None}
    build_bundle(root / "input" / "uff-port-data-x", {**SHORT}, run_id="r", session="s0", wheel=wheel, model=model)
    env = {"UFF_PORT_KAGGLE_ROOT": str(root), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    import os

    proc = subprocess.run([sys.executable, "-m", "uff_port.cloud.entry", "--session", "s0"],
                          env={**os.environ, **env}, capture_output=True, timeout=60)
    assert proc.returncode == 3
    events = [json.loads(x) for x in (root / "working" / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "failed" and events[-1]["code"] == "model_not_found"
    assert HANDLE in events[-1]["message"] and "attach" in events[-1]["message"]
    info = json.loads((root / "working" / "run" / "session.json").read_text())
    assert info["error"]["final"] is True
    assert (root / "working" / "uff-output-manifest.json").is_file()


@pytest.mark.slow
def test_kaggle_model_source_trains_the_real_path_and_the_artifact_passes_the_gates(tmp_path: Path, wheel: Path) -> None:
    from uff_port.registry.gates import DEFAULT_GATES, load_gates, run_gates
    from uff_port.registry.runmanifest import write_run_manifest

    api = FakeKaggleApi(tmp_path / "fake")
    api.publish_model(HANDLE, ensure_tiny_llama())
    # A code-evaluation suite runs in the last session, on the final adapter: its results come
    # home with the artifact, so the manifest carries them before anything is registered.
    suites = [{"suite": "ufm", "sample": 2, "max_new_tokens": 8, "batch_size": 2}]
    run, events = _kaggle_run(tmp_path, api, "ds", {"model": {"name_or_path": HUB_ID, "local_files_only": True},
                                                     "eval": {**SHORT["eval"], "suites": suites},
                                                     "cloud": {"kaggle": {"model_source": HANDLE, "session_hours": 0.5}}})
    assert run.run() == 0, [e for e in events if e[0] in ("failed", "cloud_status")][-3:]
    pushed = api.pushed(run.backend("kaggle").kernel_ref)  # type: ignore[attr-defined]
    assert pushed["metadata"]["model_sources"] == [HANDLE] and pushed["machine_shape"] == "NvidiaTeslaT4"
    assert (run.run_dir / "final" / "adapter_model.safetensors").is_file()
    manifest = json.loads(write_run_manifest(run.run_dir).read_text())
    assert manifest["lineage"]["final_step"] == 4 and manifest["lineage"]["backend"] == "kaggle"
    assert manifest["lineage"]["run_id"] == "ds"
    assert manifest["lineage"]["sessions"] == [s.name for s in run.journal.data.sessions] and manifest["lineage"]["sessions"]
    assert {"eval_loss", "train_loss", "eval/ufm/pass@1"} <= set(manifest["metrics"])
    assert json.loads((run.run_dir / "eval" / "ufm.json").read_text())["step"] == 4
    assert manifest["base_model"]["id"] == HUB_ID
    from uff_port.registry.manifest import parse_manifest

    results = run_gates(load_gates(DEFAULT_GATES), parse_manifest(manifest), None, None, optional_evidence=True)
    assert all(r.status != "fail" for r in results), [r.to_dict() for r in results]
    assert [r.status for r in results if r.gate == "quality"] == ["pass"]
    # `uff-port status` reads the merged events as it reads a local run's.
    from uff_port.training.cli import run_status

    status = run_status(run.run_dir)
    assert status["state"] == "finished" and status["step"] == 4 and status["eval_loss"] is not None
    # Merging again (a re-pull, a crash after the merge) adds nothing.
    pulled = run.run_dir / "cloud" / "pulls" / run.journal.data.sessions[0].name / "run"
    assert merge_events(run.run_dir, pulled, run.journal.data.sessions[0].name, "ds") == 0


@pytest.mark.slow
def test_a_local_copy_becomes_one_weights_dataset_reused_by_the_next_run(tmp_path: Path, wheel: Path) -> None:
    api = FakeKaggleApi(tmp_path / "fake")
    tiny = str(ensure_tiny_llama())
    for name in ("r1", "r2"):
        run, events = _kaggle_run(tmp_path, api, name, {"model": {"name_or_path": tiny, "local_files_only": True},
                                                         "training": {**SHORT["training"], "max_steps": 2}})
        assert run.run() == 0, [e for e in events if e[0] == "failed"]
    weights = [u for u in api.uploads() if "/uff-port-weights-" in u["dataset"]]
    assert len(weights) == 1 and "uff-weights.json" in weights[0]["files"]


def test_merge_events_deduplicates_by_session_and_seq(tmp_path: Path) -> None:
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    lines = [{"event": "state", "state": "loading", "ts": 1.0}, {"event": "eval", "step": 2, "loss": 1.5, "ts": 2.0}]
    (pulled / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"event": "torn')
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text('{"event":"state","state":"cloud"')  # a torn line of our own
    assert merge_events(run, pulled, "s0", "r") == 2
    assert merge_events(run, pulled, "s0", "r") == 0
    offset = len(json.dumps(lines[0]) + "\n")
    assert merge_events(run, pulled, "s1", "r", offset=offset) == 1  # only what came after the mark
    merged = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()[1:]]
    assert [(e["session"], e["seq"], e["event"]) for e in merged] == [("s0", 0, "state"), ("s0", 1, "eval"), ("s1", 0, "eval")]
    assert all(e["job_id"] == "r" for e in merged)


# ---- SageMaker: weights channel, isolation, KMS, validated by botocore ---------
def test_sagemaker_request_with_kms_vpc_isolation_and_weights_validates(tmp_path: Path, wheel: Path) -> None:
    import boto3
    from botocore.exceptions import ParamValidationError
    from moto import mock_aws

    cloud = {"sagemaker": {**SM, "kms_key_id": KMS, "network_isolation": True, "subnets": ["subnet-1"],
                           "security_group_ids": ["sg-1"]}}
    settings = validate_cloud(cloud)
    tiny = ensure_tiny_llama()
    plan = plan_weights({"model": {"name_or_path": str(tiny)}}, settings, "sagemaker", cache=tmp_path / "h.json")
    weights = {**plan.to_meta(), "local_dir": plan.local_dir}
    bundle = tmp_path / "bundle"
    build_bundle(bundle, {"training": {"max_steps": 2}}, run_id="run-a", session="s0", wheel=wheel, model=plan.to_meta())
    spec = SessionSpec("run-a", job_name("run-a", 0), 0, bundle, 3600.0, 60.0, {"weights": weights})
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="uff-test")
        backend = SageMakerBackend(None, s3, settings.sagemaker, "run-a")
        backend._upload_weights(weights)
        model_uri = backend.weights_uri(weights)
        assert model_uri is not None
        req = backend.request(spec, backend._upload(spec))
        validate_request("CreateTrainingJob", req)  # botocore's own validator
        assert req["EnableNetworkIsolation"] is True and req["VpcConfig"]["Subnets"] == ["subnet-1"]
        assert req["OutputDataConfig"]["KmsKeyId"] == KMS and req["ResourceConfig"]["VolumeKmsKeyId"] == KMS
        assert [c["ChannelName"] for c in req["InputDataConfig"]] == ["bundle", "model"]
        assert req["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3Uri"] == model_uri
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="uff-test")["Contents"]]
        assert any(k.endswith("/uff-weights.json") for k in keys)
        for key in keys:
            head = s3.head_object(Bucket="uff-test", Key=key)
            assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == KMS, key
        before = len(keys)
        backend._upload_weights(weights)  # a second run: the marker is there, nothing uploaded
        assert len(s3.list_objects_v2(Bucket="uff-test")["Contents"]) == before
    with pytest.raises(ParamValidationError):
        validate_request("CreateTrainingJob", {**req, "ResourceConfig": {**req["ResourceConfig"], "VolumeKmsKeyId": 7}})
