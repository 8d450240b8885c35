"""Shared builders for the registry tests (no tests here).

`trained_run` trains the tiny model for real, once per session; `variant_run`
derives further artifacts from it by perturbing the adapter weights, so each
has different bytes (hence a different id) without paying for more training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
_CACHE: dict[str, Path] = {}


def trained_run(base: Path) -> Path:
    """A real run directory (config.yaml, events.jsonl, final/) trained in two attempts.

    The first trainer stops at step 2; the second resumes from its checkpoint
    to step 4, so the lineage has two trainer starts, as after a preemption.
    """
    if "run" in _CACHE:
        return _CACHE["run"]
    run = base / "trained"
    for steps in (2, 4):
        cmd = [
            PYTHON, "-m", "uff_port.training", "--run-dir", str(run),
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"training.max_steps={steps}", "--set", "eval.every_steps=2", "--set", "eval.max_batches=1",
            "--set", "checkpoint.every_steps=2", "--set", "training.warmup_steps=1",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "final" / "adapter_model.safetensors").is_file()
    _CACHE["run"] = run
    return run


def variant_run(src: Path, dest: Path, *, seed: int, eval_loss: float | None = None) -> Path:
    """Copy a run, perturb its adapter deterministically and rewrite the eval metric."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoints", "artifact.json"))
    weights = dest / "final" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        tensors[name] = tensors[name] + 1e-3 * torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    if eval_loss is not None:
        with (dest / "events.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": "eval", "ts": 0.0, "step": 4, "loss": eval_loss}) + "\n")
    return dest


def bench_file(path: Path, *, p95: float = 50.0, tps: float = 100.0, outputs: list[str] | None = None) -> Path:
    outs = [{"prompt": f"p{i}", "output": o} for i, o in enumerate(outputs or ["def add(a, b): return a + b"])]
    path.write_text(json.dumps({"latency_p95_ms": p95, "tokens_per_s": tps, "outputs": outs}))
    return path


def gates_file(path: Path, **overrides: Any) -> Path:
    """A gates YAML: configs/gates.yaml with sections replaced by `overrides`."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "gates.yaml").read_text())
    for section, values in overrides.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def uff(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "uff_port", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})
