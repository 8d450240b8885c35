"""DeepSpeed ZeRO-2/3 for the LoRA recipe: the engine, its config, its checkpoint files.

`distributed.backend: deepspeed` swaps the DDP wrapper and the torch optimizer
step for a DeepSpeed engine; everything else (data, loss normalisation, events,
the checkpoint commit protocol) stays the trainer's. The same torchrun launch
starts the ranks, and the process group is joined before DeepSpeed sees it.

Checkpoints: ZeRO shards the optimizer state (and with ZeRO-3 the weights)
across ranks, so every rank writes its own shard. All ranks write into the
staging directory rank 0 opened (`DS_TAG` inside it), rank 0 adds the
trainer's files and commits the whole directory with one manifest. A shard
only resumes on the same number of ranks and the same ZeRO stage, which the
trainer checks through `layout()` before loading.

Loading never unpickles arbitrary objects: DeepSpeed's own loader uses
`weights_only=False`, ours uses `weights_only=True` with the four plain data
classes DeepSpeed puts in its optimizer files allowed, and refuses a file that
names anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import torch

from uff_port.core.config import resolve_deepspeed_config
from uff_port.protocol.errors import ErrorCode

DS_TAG: Final = "deepspeed"
PACKAGE_HINT: Final = "pip install 'uff-port[deepspeed]'"
# Plain data classes found in ZeRO-1/2/3 optimizer files (torch.serialization lists them).
_SAFE_GLOBALS: Final = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class ZeroError(Exception):
    """A DeepSpeed set-up problem, with the error code the trainer reports."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed for `device` (its accelerator is fixed at first import)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ZeroError(
            ErrorCode.NOT_AVAILABLE, f"distributed.backend: deepspeed needs the deepspeed package ({PACKAGE_HINT}): {exc}"
        ) from None
    return deepspeed


def resolve_config_path(name: str) -> Path:
    """An absolute path, or one relative to the working directory, or a shipped preset."""
    found, tried = resolve_deepspeed_config(name)
    if found is not None:
        return found
    raise ZeroError(
        ErrorCode.INVALID_CONFIG,
        f"distributed.deepspeed_config: no file at {name!r} (tried {', '.join(str(t) for t in tried)})",
    )


def _fill(value: Any, auto: Any, path: str, problems: list[str]) -> Any:
    """'auto' takes our value; an explicit value must agree with it (one source of truth)."""
    if value == "auto" or value is None:
        return auto
    if value != auto:
        problems.append(f"{path}: {value!r} in the DeepSpeed JSON, but the YAML gives {auto!r}; use \"auto\"")
    return value


def build_config(
    raw: dict[str, Any] | None, *, micro: int, accum: int, world: int, max_grad_norm: float | None, precision: str
) -> dict[str, Any]:
    """The DeepSpeed JSON with every "auto" filled in from the YAML.

    `raw` None is ZeRO-2 with DeepSpeed's defaults. Batch sizes, clipping and
    precision come from our config alone, so the two can never disagree.
    """
    ds = {k: v for k, v in (raw or {"zero_optimization": {"stage": 2}}).items() if not k.startswith("_")}
    problems: list[str] = []
    ds["train_micro_batch_size_per_gpu"] = _fill(ds.get("train_micro_batch_size_per_gpu"), micro,
                                                 "train_micro_batch_size_per_gpu", problems)
    ds["gradient_accumulation_steps"] = _fill(ds.get("gradient_accumulation_steps"), accum,
                                              "gradient_accumulation_steps", problems)
    ds["train_batch_size"] = _fill(ds.get("train_batch_size"), micro * accum * world, "train_batch_size", problems)
    ds["gradient_clipping"] = _fill(ds.get("gradient_clipping"), float(max_grad_norm or 0.0),
                                    "gradient_clipping", problems)
    for key, want in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = dict(ds.get(key) or {})
        section["enabled"] = _fill(section.get("enabled", "auto"), want, f"{key}.enabled", problems)
        ds[key] = section
    zero = dict(ds.get("zero_optimization") or {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    ds["zero_optimization"] = zero
    ds.setdefault("steps_per_print", 10**9)  # our progress events say it; keep DeepSpeed quiet
    if problems:
        raise ZeroError(ErrorCode.INVALID_CONFIG, "distributed.deepspeed_config: " + "; ".join(problems))
    return ds


def load_config(path: str | None, **fill: Any) -> dict[str, Any]:
    raw = None
    if path is not None:
        file = resolve_config_path(path)
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ZeroError(ErrorCode.INVALID_CONFIG, f"distributed.deepspeed_config: {file} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ZeroError(ErrorCode.INVALID_CONFIG, f"distributed.deepspeed_config: {file} must hold a JSON object")
    return build_config(raw, **fill)


def stage_of(ds: dict[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    off = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")) == "cpu"


def layout(ds: dict[str, Any], world: int) -> str:
    """What a checkpoint's optimizer files look like; resume needs the same layout."""
    return f"deepspeed-zero{stage_of(ds)}-world{world}"


def make_optimizer(deepspeed: Any, ds: dict[str, Any], params: list[torch.nn.Parameter], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam when the optimizer lives on the host (ZeRO-Offload)."""
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)  # type: ignore[no-any-return]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def initialize(deepspeed: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               ds: dict[str, Any]) -> Any:
    """The engine over our model, optimizer and LR schedule (stepped by the engine)."""
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


def _safe_checkpoint_engine(inner: Any) -> Any:
    """Wrap DeepSpeed's checkpoint engine so that loads are weights_only."""
    import importlib

    allowed = []
    for dotted in _SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), name))

    class SafeLoad(type(inner)):  # type: ignore[misc]
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, allowed, map_location)

    inner.__class__ = SafeLoad
    return inner


def safe_load(path: str | Path, allowed: list[Any], map_location: Any = None) -> Any:
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - set(_SAFE_GLOBALS)
    if unsafe:
        raise ZeroError(ErrorCode.CORRUPT_CHECKPOINT, f"{path}: refusing to load objects {sorted(unsafe)} (not plain data)")
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def save(engine: Any, directory: Path) -> None:
    """Every rank writes its shard of model and optimizer state (a collective)."""
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)


def load(engine: Any, directory: Path) -> None:
    """Restore trainable weights, optimizer shards and the LR schedule (a collective)."""
    path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ZeroError(ErrorCode.CORRUPT_CHECKPOINT, f"{directory}: no DeepSpeed state under {DS_TAG}/")


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], stage: int) -> Iterator[None]:
    """Whole trainable weights on every rank for the duration (ZeRO-3 partitions them)."""
    if stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
