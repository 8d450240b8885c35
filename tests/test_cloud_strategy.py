"""The strategy is honoured everywhere: a cloud config runs the cloud job or is refused with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from uff_port.client import WorkerClient, WorkerError
from uff_port.cloud.fakes import FakeKaggleApi
from uff_port.training.builtin import ensure_tiny_llama

HANDLE = "deepseek-ai/deepseek-coder/transformers/1.3b-base/1"
SHORT: dict[str, Any] = {
    "model": {"name_or_path": "deepseek-ai/deepseek-coder-1.3b-base", "local_files_only": True},
    "data": {"path": "builtin:sample-corpus", "seq_len": 64},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "device": "cpu",
                 "precision": "fp32", "progress_every_seconds": 0},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "eval": {"every_steps": 2, "max_batches": 1},
    "output": {"plot": False},
    "cloud": {"kaggle": {"model_source": HANDLE, "session_hours": 0.5}, "poll": {"interval_seconds": 0.2},
              "safety_margin_seconds": 5},
}


def _no_region_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION", "UFF_PORT_CLOUD_FAKE")}


def test_the_trainer_refuses_a_cloud_strategy(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(SHORT))
    proc = subprocess.run(
        [sys.executable, "-m", "uff_port.training", "--run-dir", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml"),
         "--set", "strategy=kaggle"],
        capture_output=True, timeout=60,
    )
    assert proc.returncode == 3
    failed = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[-1])
    assert failed["code"] == "invalid_config" and "strategy: kaggle runs in the cloud" in failed["message"]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("how", [["--strategy", "sagemaker"], ["--set", "strategy=sagemaker"]])
def test_train_with_sagemaker_and_no_settings_is_refused_naming_them(tmp_path: Path, how: list[str]) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in SHORT.items() if k != "cloud"}))
    proc = subprocess.run(
        [sys.executable, "-m", "uff_port", "train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"), "--quiet", *how],
        capture_output=True, text=True, timeout=60, env=_no_region_env(),
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    for field in ("cloud.sagemaker.bucket", "cloud.sagemaker.role_arn", "cloud.sagemaker.image_uri", "cloud.sagemaker.region"):
        assert field in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "events.jsonl").exists()


def test_worker_checks_sagemaker_settings_when_train_is_received(tmp_path: Path) -> None:
    config = {"strategy": "sagemaker", "cloud": {"sagemaker": {"bucket": "b-1", "role_arn": "arn:aws:iam::0:role/r",
                                                                "image_uri": "img:1"}}}
    runs = tmp_path / "runs"
    runs.mkdir()
    with WorkerClient(runs_root=runs, env=_no_region_env()) as w:
        with pytest.raises(WorkerError) as err:
            w.request("train", {"config": config, "run_dir": "r"})
    assert err.value.code == "invalid_config"
    assert "cloud.sagemaker.region: required" in err.value.message
    assert not (runs / "r" / "cloud").exists()


@pytest.mark.slow
def test_uff_port_train_with_set_strategy_kaggle_runs_the_cloud_path(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    FakeKaggleApi(fake / "kaggle").publish_model(HANDLE, ensure_tiny_llama())
    wheel = tmp_path / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(SHORT))
    env = {**os.environ, "UFF_PORT_CLOUD_FAKE": str(fake), "UFF_PORT_WHEEL": str(wheel)}
    run_dir = tmp_path / "runs" / "kg"
    proc = subprocess.run(
        [sys.executable, "-m", "uff_port", "train", str(tmp_path / "c.yaml"), "--run-dir", str(run_dir), "--quiet",
         "--set", "strategy=kaggle"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "cloud" / "journal.json").is_file()  # the cloud path ran, not a local trainer
    assert list((fake / "kaggle" / "kernels").iterdir())
    manifest = json.loads((run_dir / "final" / "artifact.json").read_text())
    assert manifest["lineage"]["backend"] == "kaggle" and manifest["lineage"]["final_step"] == 2
    assert "eval_loss" in manifest["metrics"]
