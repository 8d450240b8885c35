"""A manager adapter starts from its parent's weights (`model.init_adapter`), and says so (`lineage.parent`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BASE = ["--set", "training.max_steps=2", "--set", "checkpoint.every_steps=2", "--set", "eval.every_steps=null",
        "--set", "output.plot=false", "--quiet"]


def _train(run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uff_port", "train", "tiny", "--run-dir", str(run), *BASE, *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("parent") / "main"
    done = _train(run)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def test_child_adapter_starts_from_the_parent_and_records_it(tmp_path: Path, parent: Path) -> None:
    parent_id = json.loads((parent / "final" / "artifact.json").read_text())["artifact_id"]

    child = tmp_path / "ufm"
    # a learning rate too small to move anything: the child's adapter is the parent's
    done = _train(child, "--set", f"model.init_adapter={parent / 'final'}", "--set", "training.learning_rate=0.000000000001",
                  "--set", "training.warmup_steps=0")
    assert done.returncode == 0, done.stderr[-2000:]
    lineage = json.loads((child / "final" / "artifact.json").read_text())["lineage"]
    assert lineage["parent"] == parent_id
    a = load_file(str(parent / "final" / "adapter_model.safetensors"))
    b = load_file(str(child / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # lora_B starts at zero in a fresh adapter; the parent's is trained, so the copy is real
    assert any(float(v.abs().sum()) > 0 for k, v in b.items() if "lora_B" in k)


def test_a_parent_of_another_shape_is_refused_by_name(tmp_path: Path, parent: Path) -> None:
    child = _train(tmp_path / "bad", "--set", f"model.init_adapter={parent / 'final'}", "--set", "lora.r=4")
    assert child.returncode != 0
    assert "model.init_adapter" in child.stderr + child.stdout
    missing = _train(tmp_path / "bad2", "--set", f"model.init_adapter={tmp_path / 'nowhere'}")
    assert missing.returncode != 0 and "adapter_model.safetensors" in missing.stderr + missing.stdout
