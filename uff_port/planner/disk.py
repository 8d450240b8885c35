"""Refuse a job whose run directory's disk cannot hold its checkpoints (code `disk_full`).

A full disk found at the first checkpoint costs the steps since the start; found
at step 40,000 it would cost the run. So the worker and the trainer check the
free space before anything loads, from the same sizes the memory planner uses:
a checkpoint holds the trainable weights and two Adam moments in fp32 (the
frozen base model is never saved), the final export one more copy of the
weights (the whole model when `output.merge` is on). Pure arithmetic and one
`statvfs`: no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from uff_port.planner.arch import ArchError, resolve_arch
from uff_port.planner.sizes import fmt_bytes
from uff_port.training.config import Config

# events.jsonl, trainer.log, config and manifests, RNG and data cursor, sweep headroom.
SLACK_BYTES: Final = 64 * 2**20
FP32: Final = 4


@dataclass(frozen=True)
class DiskReport:
    fits: bool
    needed: int | None
    free: int
    message: str


def checkpoint_bytes(cfg: Config) -> int | None:
    """Estimated size of one checkpoint of `cfg`, or None when the architecture is unknown."""
    try:
        arch = resolve_arch(cfg.model.name_or_path, cfg.model.revision)
    except ArchError:
        return None
    trainable = arch.lora_params(cfg.lora.r, cfg.lora.target_modules) if cfg.lora.enabled else arch.n_params
    return trainable * FP32 * 3  # weights, exp_avg, exp_avg_sq


def required_bytes(cfg: Config) -> int | None:
    """Room for the checkpoint being written beside the newest kept one, plus the final export."""
    ckpt = checkpoint_bytes(cfg)
    if ckpt is None:
        return None
    final = 0
    if cfg.output.save_final:
        final = ckpt // 3
        if cfg.output.merge:
            arch = resolve_arch(cfg.model.name_or_path, cfg.model.revision)
            final += arch.n_params * 2  # merged weights in 16-bit
    return 2 * ckpt + final + SLACK_BYTES


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def check_disk(cfg: Config, run_dir: Path) -> DiskReport:
    free = free_bytes(run_dir)
    need = required_bytes(cfg)
    if need is None:
        return DiskReport(True, None, free, "disk space not checked: unknown model architecture")
    if free >= need:
        return DiskReport(True, need, free, f"{fmt_bytes(free)} free, {fmt_bytes(need)} needed")
    return DiskReport(
        False, need, free,
        f"{run_dir}: {fmt_bytes(free)} free on its disk, but this job needs about {fmt_bytes(need)} "
        f"(two checkpoints of ~{fmt_bytes(checkpoint_bytes(cfg) or 0)} and the final adapter); "
        "free some space (old runs, checkpoint.keep_last) and send the same train again",
    )  # fmt: skip

