"""The corpus uploaded once (content-addressed) and, when asked, sealed with AES-GCM before it leaves."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.cloud.backends.base import SessionSpec
from uff_port.cloud.backends.kaggle import KaggleBackend
from uff_port.cloud.backends.sagemaker import SageMakerBackend, job_name
from uff_port.cloud.bundle import build_bundle
from uff_port.cloud.corpus import CorpusError, seal, stage_corpus, unseal
from uff_port.cloud.fakes import FakeKaggleApi
from uff_port.cloud.fakes.sagemaker import validate_request
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.core.config import validate_config
from uff_port.core.exits import ExitCode

pytest.importorskip("cryptography")

KEY = base64.b64encode(bytes(range(32))).decode()
CANARY = "PROPRIETARY-CANARY"
SM = {"bucket": "uff-test", "role_arn": "arn:aws:iam::000000000000:role/uff", "image_uri": "img:1", "region": "us-east-1"}


def _corpus(path: Path) -> Path:
    lines = [{"text": f"def f{i}(x):\n    # {CANARY}-{i}\n    return x * {i} + {i % 7}\n"} for i in range(48)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_staging_is_content_addressed_and_sealed_per_key(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "code.jsonl")
    plain = stage_corpus([src], tmp_path / "cache", None)
    again = stage_corpus([src], tmp_path / "cache", None)
    sealed = stage_corpus([src], tmp_path / "cache", base64.b64decode(KEY))
    other = stage_corpus([src], tmp_path / "cache", bytes(32))
    assert plain.address == again.address and len({plain.address, sealed.address, other.address}) == 3
    assert sealed.files == ["00-code.jsonl.aesgcm"]
    blob = (sealed.path / sealed.files[0]).read_bytes()
    assert CANARY.encode() not in blob
    assert unseal(blob, base64.b64decode(KEY), "00-code.jsonl") == src.read_bytes()
    with pytest.raises(CorpusError, match="wrong key"):
        unseal(blob, bytes(32), "00-code.jsonl")
    with pytest.raises(CorpusError):  # the name is bound: a file cannot be passed off as another
        unseal(seal(b"x", bytes(32), "a"), bytes(32), "b")


def _run(tmp_path: Path, api: FakeKaggleApi, name: str, corpus: Path, encryption: dict[str, Any]) -> tuple[CloudRun, list[tuple[str, dict[str, Any]]]]:
    cfg = validate_config({
        "strategy": "kaggle",
        "data": {"path": str(corpus), "seq_len": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "device": "cpu",
                     "precision": "fp32", "progress_every_seconds": 0},
        "checkpoint": {"every_steps": 2},
        "eval": {"every_steps": 2, "max_batches": 1},
        "output": {"plot": False},
        "cloud": {"poll": {"interval_seconds": 0.2}, "safety_margin_seconds": 5, "kaggle": {"session_hours": 0.5},
                  "encryption": encryption},
    })
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


def test_encryption_without_a_key_is_refused_before_anything_is_uploaded(tmp_path: Path, wheel: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UFF_PORT_CORPUS_KEY", raising=False)
    api = FakeKaggleApi(tmp_path / "fake")
    run, events = _run(tmp_path, api, "nokey", _corpus(tmp_path / "code.jsonl"), {"enabled": True})
    assert run.run() == ExitCode.REFUSED
    failed = [f for e, f in events if e == "failed"][0]
    assert failed["code"] == "invalid_config" and "UFF_PORT_CORPUS_KEY is not set" in failed["message"]
    assert api.uploads() == []


@pytest.mark.slow
def test_sealed_corpus_is_uploaded_once_and_never_travels_in_plain(tmp_path: Path, wheel: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The key reaches the fake kernel through its environment, standing in for the Kaggle secret.
    monkeypatch.setenv("UFF_PORT_CORPUS_KEY", KEY)
    api = FakeKaggleApi(tmp_path / "fake")
    corpus = _corpus(tmp_path / "code.jsonl")
    for name in ("r1", "r2"):
        run, events = _run(tmp_path, api, name, corpus, {"enabled": True})
        assert run.run() == 0, [f for e, f in events if e == "failed"]
        assert (run.run_dir / "final" / "adapter_model.safetensors").is_file()
        bundle = run.run_dir / "cloud" / "bundle"
        for path in [p for p in bundle.rglob("*") if p.is_file()]:
            blob = path.read_bytes()
            assert CANARY.encode() not in blob and KEY.encode() not in blob, path
        for e, f in events:
            assert KEY not in json.dumps(f, default=str), e
    corpus_uploads = [u for u in api.uploads() if "/uff-port-corpus-" in u["dataset"]]
    assert len(corpus_uploads) == 1  # the second run (and its session) uploaded no corpus
    session_uploads = [u for u in api.uploads() if "/uff-port-data-" in u["dataset"]]
    assert len(session_uploads) == 2
    # Nothing the provider stored holds the plain corpus or the key: datasets, kernels, outputs.
    for path in [p for p in (tmp_path / "fake").rglob("*") if p.is_file() and not p.is_symlink()]:
        blob = path.read_bytes()
        if path.suffix == ".tar" or "datasets" in path.parts:
            assert CANARY.encode() not in blob, path
        assert KEY.encode() not in blob, path
    manifest_events = (tmp_path / "runs" / "r2" / "events.jsonl").read_text()
    assert '"event":"eval"' in manifest_events  # the run came home with its metrics


def test_sagemaker_corpus_channel_uploaded_once_with_the_secrets_name_only(tmp_path: Path, wheel: Path) -> None:
    import boto3
    from moto import mock_aws

    settings = validate_cloud({"sagemaker": SM, "encryption": {"enabled": True, "sagemaker_secret_id": "uff/corpus-key"}})
    piece = stage_corpus([_corpus(tmp_path / "code.jsonl")], tmp_path / "cache", base64.b64decode(KEY))
    corpus = {**piece.meta(), "path": str(piece.path), "sagemaker_secret_id": "uff/corpus-key"}
    bundle = tmp_path / "bundle"
    build_bundle(bundle, {"training": {"max_steps": 2}, "data": {"path": str(tmp_path / "code.jsonl")}},
                 run_id="run-a", session="s0", wheel=wheel, corpus=piece.meta(), secrets=[KEY])
    assert not list((bundle / "data").iterdir())  # the bundle names the corpus, it does not carry it
    spec = SessionSpec("run-a", job_name("run-a", 0), 0, bundle, 3600.0, 60.0, {"corpus": corpus})
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="uff-test")
        backend = SageMakerBackend(None, s3, settings.sagemaker, "run-a")
        backend._upload_corpus(corpus)
        count = len(s3.list_objects_v2(Bucket="uff-test")["Contents"])
        backend._upload_corpus(corpus)
        assert len(s3.list_objects_v2(Bucket="uff-test")["Contents"]) == count == 2
        req = backend.request(spec, "s3://uff-test/b/")
    validate_request("CreateTrainingJob", req)
    assert [c["ChannelName"] for c in req["InputDataConfig"]] == ["bundle", "corpus"]
    assert req["HyperParameters"]["uff_corpus_secret"] == "uff/corpus-key"
    assert KEY not in json.dumps(req)
