"""Platform presets: `uff-port plan --platform` plans for the GPUs a session or instance really has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from uff_port.cli import main
from uff_port.cloud.platforms import PLATFORMS, hours_per_epoch


def test_plan_for_kaggle_t4x2_is_fp16_without_flash_attention_and_writes_a_kaggle_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kaggle.yaml"
    rc = main(["plan", "--platform", "kaggle-t4x2", "--model", "deepseek-coder-1.3b", "--attn", "flash_attention_2",
               "--corpus-tokens", "20000000", "--json", "--write-config", str(out)])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    adv = plan["platform"]
    assert plan["gpus"] == [15 * 2**30, 15 * 2**30]
    assert adv["overrides"]["training.precision"] == "fp16" and adv["overrides"]["strategy"] == "kaggle"
    assert adv["overrides"]["model.attn_implementation"] == "sdpa"
    assert adv["overrides"]["cloud.kaggle.accelerator"] == "NvidiaTeslaT4"
    assert 0 < adv["hours_per_epoch"] < 100
    cfg = yaml.safe_load(out.read_text())
    assert cfg["strategy"] == "kaggle" and cfg["training"]["precision"] == "fp16"
    assert cfg["training"]["micro_batch_size"] == plan["recommended"]["micro_batch"]


def test_sagemaker_presets_name_their_instance_and_bf16_only_on_ampere(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("sagemaker-g5.xlarge", "sagemaker-g4dn.xlarge", "sagemaker-p3.2xlarge"):
        assert main(["plan", "--platform", name, "--model", "deepseek-coder-1.3b", "--json"]) == 0
        adv = json.loads(capsys.readouterr().out)["platform"]
        assert adv["overrides"]["cloud.sagemaker.instance_type"] == "ml." + name.split("-", 1)[1]
        assert adv["overrides"]["training.precision"] == ("bf16" if name.endswith("g5.xlarge") else "fp16")
    assert main(["plan", "--platform", "kaggle-p100"]) == 2
    assert "unknown 'kaggle-p100'" in capsys.readouterr().err


def test_epoch_estimate_scales_with_tokens_and_checkpointing() -> None:
    t4 = PLATFORMS["kaggle-t4x2"]
    base = hours_per_epoch(t4, 1_300_000_000, 10_000_000, "lora", False, 2)
    assert hours_per_epoch(t4, 1_300_000_000, 20_000_000, "lora", False, 2) == pytest.approx(2 * base)
    assert hours_per_epoch(t4, 1_300_000_000, 10_000_000, "lora", True, 2) == pytest.approx(1.5 * base)
