"""Where am I running? Kaggle kernel, SageMaker job, or a plain machine.

Maps each provider's directories onto one run directory so the trainer never
knows where it runs. Every root can be moved by an environment variable
(`UFF_PORT_KAGGLE_ROOT`, `UFF_PORT_SM_ROOT`) so tests point them at temporary
directories and run the real entry point.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

KAGGLE_ROOT_ENV: Final = "UFF_PORT_KAGGLE_ROOT"
SM_ROOT_ENV: Final = "UFF_PORT_SM_ROOT"
BUNDLE_MARKER: Final = "uff-bundle.json"
SM_BUNDLE_CHANNEL: Final = "bundle"
SM_MODEL_CHANNEL: Final = "model"
"""The base weights from S3 (cloud.sagemaker.model_s3_uri or an uploaded local copy)."""


class PlatformError(Exception):
    """The environment lacks what the entry point needs (no bundle, no budget)."""


@dataclass(frozen=True)
class Platform:
    kind: str
    """`kaggle`, `sagemaker` or `local`."""
    bundle_dir: Path
    run_dir: Path
    output_dir: Path
    """The tree whose manifest the pull verifies (Kaggle: /kaggle/working; SageMaker: model dir)."""
    budget_seconds: float | None
    hyperparameters: dict[str, str]


def _kaggle_root() -> Path:
    return Path(os.environ.get(KAGGLE_ROOT_ENV, "/kaggle"))


def _sm_root() -> Path:
    return Path(os.environ.get(SM_ROOT_ENV, "/opt/ml"))


def is_kaggle() -> bool:
    root = _kaggle_root()
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or (
        (root / "input").is_dir() and (root / "working").is_dir()
    )


def is_sagemaker() -> bool:
    if os.environ.get("SM_TRAINING_ENV") or os.environ.get("SM_MODEL_DIR"):
        return True
    if any(k.startswith("SM_CHANNEL_") for k in os.environ):
        return True
    return (_sm_root() / "input" / "config" / "hyperparameters.json").is_file()


def find_bundle(search_root: Path) -> Path:
    """The input directory holding our bundle (Kaggle mounts datasets one level or two down)."""
    candidates = sorted(p.parent for p in search_root.glob(f"*/{BUNDLE_MARKER}"))
    candidates += sorted(p.parent for p in search_root.glob(f"*/*/{BUNDLE_MARKER}"))
    if not candidates:
        raise PlatformError(f"no {BUNDLE_MARKER} under {search_root}: was the dataset attached?")
    return candidates[0]


def sagemaker_hyperparameters() -> dict[str, str]:
    """SageMaker passes hyperparameters as strings (JSON-encoded by the SDK)."""
    raw: Any = None
    if os.environ.get("SM_HPS"):
        raw = json.loads(os.environ["SM_HPS"])
    elif os.environ.get("SM_TRAINING_ENV"):
        raw = json.loads(os.environ["SM_TRAINING_ENV"]).get("hyperparameters")
    else:
        path = _sm_root() / "input" / "config" / "hyperparameters.json"
        if path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for key, value in (raw or {}).items():
        text = str(value)
        # The SDK JSON-encodes string values ("\"abc\""); the raw API does not.
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1]
        out[str(key)] = text
    return out


def sm_channel(name: str) -> Path:
    env = os.environ.get(f"SM_CHANNEL_{name.upper()}")
    return Path(env) if env else _sm_root() / "input" / "data" / name


def detect(budget_seconds: float | None = None, run_dir: str | None = None) -> Platform:
    """Detect the platform and lay out its directories (creating the run directory)."""
    if is_sagemaker():
        hps = sagemaker_hyperparameters()
        root = _sm_root()
        bundle = sm_channel(SM_BUNDLE_CHANNEL)
        if not (bundle / BUNDLE_MARKER).is_file():
            bundle = find_bundle(root / "input" / "data")
        model_dir = Path(os.environ.get("SM_MODEL_DIR", str(root / "model")))
        # /opt/ml/checkpoints is synced to S3 by CheckpointConfig and restored on
        # a spot restart or the next chained job: the run lives there.
        rd = Path(run_dir) if run_dir else root / "checkpoints" / "run"
        budget = budget_seconds
        if budget is None and hps.get("uff_max_runtime"):
            budget = float(hps["uff_max_runtime"])
        model_dir.mkdir(parents=True, exist_ok=True)
        rd.mkdir(parents=True, exist_ok=True)
        return Platform("sagemaker", bundle, rd, model_dir, budget, hps)
    if is_kaggle():
        root = _kaggle_root()
        bundle = find_bundle(root / "input")
        working = root / "working"
        rd = Path(run_dir) if run_dir else working / "run"
        rd.mkdir(parents=True, exist_ok=True)
        return Platform("kaggle", bundle, rd, working, budget_seconds, {})
    if run_dir is None:
        raise PlatformError("not in Kaggle or SageMaker: pass --run-dir and --bundle")
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    return Platform("local", rd, rd, rd, budget_seconds, {})
