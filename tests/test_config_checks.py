"""Checks across config sections run at validation, before anything heavy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uff_port.client import WorkerClient, WorkerError
from uff_port.core.config import (
    PRESETS_DIR,
    ConfigError,
    deepspeed_zero_stage,
    load_config,
    validate_config,
)

ZERO3 = {"distributed.backend": "deepspeed", "distributed.nproc": 2, "training.grad_accum_steps": 2,
         "distributed.deepspeed_config": "configs/deepspeed/zero3.json"}  # fmt: skip


def problems(overrides: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        validate_config({}, overrides)
    return exc.value.problems


def test_every_cross_section_problem_is_listed_by_dotted_path() -> None:
    found = problems({**ZERO3, "output.merge": True, "quantization.mode": "nf4", "training.grad_accum_steps": 3})
    assert [p.split(":")[0] for p in found] == ["training.grad_accum_steps", "output.merge", "quantization.mode"]
    assert problems({"lora.enabled": False, "quantization.mode": "nf4"})[0].startswith("lora.enabled: ")


def test_what_the_checks_allow() -> None:
    validate_config({}, {"lora.enabled": False})  # a full fine-tune has trainable weights
    validate_config({}, {**ZERO3, "distributed.deepspeed_config": "configs/deepspeed/zero2.json", "output.merge": True})
    validate_config({}, {**ZERO3, "distributed.deepspeed_config": None, "output.merge": True})  # ZeRO-2 default
    # A JSON this machine cannot read is the trainer's to report, where it runs.
    validate_config({}, {**ZERO3, "distributed.deepspeed_config": "/nonexistent/zero3.json", "output.merge": True})


def test_the_zero_stage_is_read_from_the_deepspeed_json(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_zero_stage(str(ds)) == 3
    assert deepspeed_zero_stage("deepspeed/zero2.json") == 2  # a preset, however it is spelled
    ds.write_text("{not json")
    assert deepspeed_zero_stage(str(ds)) is None
    assert "output.merge: not with ZeRO-3" in problems({**ZERO3, "distributed.deepspeed_config": str(
        _write(tmp_path / "z3.json", {"zero_optimization": {"stage": 3}})), "output.merge": True})[0]


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_presets_are_package_resources() -> None:
    assert PRESETS_DIR.parent.name == "uff_port" and (PRESETS_DIR / "tiny.yaml").is_file()
    assert (PRESETS_DIR / "deepspeed" / "zero3.json").is_file()
    assert load_config("tiny").name


def test_the_worker_refuses_them_before_starting(runs_root: Path) -> None:
    with WorkerClient(runs_root=runs_root) as w:
        with pytest.raises(WorkerError) as exc:
            w.request("train", {"config_path": "tiny", "overrides": {**ZERO3, "output.merge": True}})
        assert exc.value.code == "invalid_config"
        assert exc.value.details["problems"][0].startswith("output.merge: ")
        assert w.request("status")["state"] == "idle"
        assert w.shutdown() == 0
