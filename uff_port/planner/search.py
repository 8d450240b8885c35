"""Enumerate candidate configurations, estimate each, and pick the fastest that fits.

"Fastest" is `estimate.speed_score`: GPUs doing useful work x strategy efficiency
(DDP > ZeRO-2 > ZeRO-3 > offload) x method (LoRA > QLoRA > full) x no gradient
checkpointing (> checkpointing) x micro-batch utilisation. Ties go to the
candidate with the lower peak, which leaves more margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.core.config import resolve_deepspeed_config
from uff_port.planner.arch import Arch
from uff_port.planner.estimate import (
    DEEPSPEED,
    Candidate,
    Estimate,
    Method,
    Strategy,
    Workload,
    estimate,
    speed_score,
)

DEFAULT_MARGIN: Final = 0.10
DEFAULT_MB_MAX: Final = 8
DEFAULT_GLOBAL_BATCH: Final = 16
DS_PRESETS: Final = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3-offload.json"}


@dataclass
class Scored:
    """An estimate judged against the hardware."""

    est: Estimate
    fits_gpu: bool
    fits_cpu: bool
    score: float

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def to_dict(self) -> dict[str, Any]:
        c = self.est.candidate
        return {
            "label": c.label,
            "method": c.method,
            "strategy": c.strategy,
            "nproc": c.nproc,
            "gradient_checkpointing": c.ckpt_mode,
            "offload_activations": c.offload,
            "micro_batch": c.micro_batch,
            "gpu": dict(self.est.gpu),
            "gpu_total": self.est.gpu_total,
            "gpu_reserved": self.est.reserved,
            "cpu": dict(self.est.cpu),
            "cpu_total": self.est.cpu_total,
            "fits": self.fits,
            "fits_gpu": self.fits_gpu,
            "fits_cpu": self.fits_cpu,
            "score": round(self.score, 4),
        }


def micro_batches(mb_max: int) -> list[int]:
    """1, 2, 4, ... up to and including `mb_max`."""
    out = [2**k for k in range(int(math.log2(mb_max)) + 1)]
    return sorted(set(out) | {mb_max})


def candidates(n_gpus: int, methods: tuple[Method, ...], mb_max: int, *, offload: bool = False) -> list[Candidate]:
    """Every (method, strategy, checkpointing, micro-batch) worth estimating on this hardware.

    Activation offload only with `offload`: it needs pinned host RAM the plan must be able
    to check (`--cpu-ram`, or the guard's own host).
    """
    shapes: list[tuple[Strategy, int]] = [("single", 1)]
    if n_gpus >= 1:
        shapes.append(("zero3_offload", n_gpus))
    if n_gpus >= 2:
        shapes += [("ddp", n_gpus), ("zero2", n_gpus), ("zero3", n_gpus)]
    out = []
    for method in methods:
        if method == "qlora" and n_gpus == 0:
            continue  # bitsandbytes 4-bit is CUDA only
        for strategy, nproc in shapes:
            if method == "qlora" and strategy in DEEPSPEED:
                continue  # QLoRA is spread with DDP (4-bit params do not shard under ZeRO)
            offloads = (False, True) if offload and n_gpus >= 1 and strategy in ("single", "ddp") else (False,)
            for ckpt, every in ((False, 1), (True, 1), (True, 2)):
                for off in offloads:
                    if off and ckpt and every == 1:
                        continue  # nothing left to offload but the loss' and the last norm's tensors
                    for mb in micro_batches(mb_max):
                        out.append(Candidate(method, strategy, nproc, ckpt, mb, every, off))
    return out


def judge(est: Estimate, gpu_bytes: int | None, cpu_bytes: int | None, margin: float) -> Scored:
    usable = 1.0 - margin
    fits_gpu = gpu_bytes is None or est.gpu_total <= gpu_bytes * usable
    fits_cpu = cpu_bytes is None or est.cpu_total <= cpu_bytes * usable
    return Scored(est, fits_gpu, fits_cpu, speed_score(est.candidate))


def rank(scored: list[Scored]) -> list[Scored]:
    """Fastest first; among equals, the smaller peak first."""
    return sorted(scored, key=lambda s: (-s.score, s.est.gpu_total, s.est.cpu_total))


def plan(
    arch: Arch,
    wl: Workload,
    gpus: list[int],
    cpu_ram: int | None,
    *,
    margin: float = DEFAULT_MARGIN,
    mb_max: int = DEFAULT_MB_MAX,
    methods: tuple[Method, ...] = ("full", "lora", "qlora"),
    recommend_from: tuple[Method, ...] = ("lora", "qlora"),
) -> tuple[list[Scored], Scored | None]:
    """All candidates (ranked) and the recommended one, or None when nothing fits."""
    gpu_cap = min(gpus) if gpus else None
    scored = [judge(estimate(arch, c, wl), gpu_cap, cpu_ram, margin)
              for c in candidates(len(gpus), methods, mb_max, offload=cpu_ram is not None)]
    ranked = rank(scored)
    best = next((s for s in ranked if s.fits and s.est.candidate.method in recommend_from), None)
    return ranked, best


def summary_rows(ranked: list[Scored]) -> list[Scored]:
    """Per (method, strategy, checkpointing): the largest micro-batch that fits, else mb 1."""
    groups: dict[tuple[str, str, bool | str, bool], list[Scored]] = {}
    for s in ranked:
        c = s.est.candidate
        groups.setdefault((c.method, c.strategy, c.ckpt_mode, c.offload), []).append(s)
    rows = []
    for group in groups.values():
        fitting = [s for s in group if s.fits]
        pick = (max(fitting, key=lambda s: s.est.candidate.micro_batch) if fitting
                else min(group, key=lambda s: s.est.candidate.micro_batch))
        rows.append(pick)
    return rank(rows)


def grad_accum(cand: Candidate, global_batch: int) -> int:
    """`training.grad_accum_steps` for at least `global_batch` sequences per optimizer step.

    The config's accumulation is global (docs/training.md: a step is micro_batch_size *
    grad_accum_steps sequences whatever the process count; each rank runs grad_accum_steps /
    nproc of them), so it is a multiple of nproc, not the per-rank count.
    """
    per_rank = max(1, math.ceil(global_batch / (cand.micro_batch * cand.nproc)))
    return per_rank * cand.nproc


def overrides_for(cand: Candidate, global_batch: int | None = None) -> dict[str, Any]:
    """The dotted config keys that select `cand` (deepspeed_config names a preset)."""
    out: dict[str, Any] = {
        "lora.enabled": cand.method != "full",
        "quantization.mode": "nf4" if cand.method == "qlora" else "none",
        "model.gradient_checkpointing": cand.ckpt_mode,
        "model.offload_activations": cand.offload,
        "training.micro_batch_size": cand.micro_batch,
        "distributed.nproc": cand.nproc,
        "distributed.backend": "deepspeed" if cand.strategy in DEEPSPEED else (
            "ddp" if cand.nproc > 1 else "auto"),
        "distributed.deepspeed_config": (
            f"configs/deepspeed/{DS_PRESETS[cand.strategy]}" if cand.strategy in DEEPSPEED else None),
    }
    if global_batch is not None:
        out["training.grad_accum_steps"] = grad_accum(cand, global_batch)
    return out


def deepspeed_json(strategy: Strategy) -> dict[str, Any]:
    """A minimal DeepSpeed config for `strategy`, used when no preset file is present."""
    zero: dict[str, Any] = {"stage": 2 if strategy == "zero2" else 3, "overlap_comm": True,
                            "contiguous_gradients": True}
    if strategy == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def config_for(arch: Arch, wl: Workload, cand: Candidate, global_batch: int,
               repo_root: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config map for our schema, DeepSpeed JSON to write beside it or None).

    The DeepSpeed JSON is returned only when the preset is missing (from `repo_root`/configs
    when given, else from the shipped presets).
    """
    ov = overrides_for(cand, global_batch)
    raw: dict[str, Any] = {
        "name": f"{arch.name}-{cand.method}".replace(":", "-").replace("/", "-"),
        "model": {
            "name_or_path": arch.hub_id or arch.name,
            "gradient_checkpointing": ov["model.gradient_checkpointing"],
            "offload_activations": ov["model.offload_activations"],
            "attn_implementation": wl.attn,
        },
        "data": {"seq_len": wl.seq_len},
        "lora": {"enabled": ov["lora.enabled"], "r": wl.lora_r, "dropout": wl.lora_dropout,
                 "target_modules": list(wl.lora_targets)},
        "quantization": {"mode": ov["quantization.mode"], "double_quant": wl.double_quant},
        "training": {"micro_batch_size": cand.micro_batch,
                     "grad_accum_steps": ov["training.grad_accum_steps"], "loss": wl.loss},
        "distributed": {"nproc": cand.nproc, "backend": ov["distributed.backend"],
                        "deepspeed_config": ov["distributed.deepspeed_config"]},
    }
    extra = None
    if cand.strategy in DEEPSPEED:
        name = ov["distributed.deepspeed_config"]
        present = (repo_root / name).is_file() if repo_root else resolve_deepspeed_config(name)[0] is not None
        if not present:
            extra = deepspeed_json(cand.strategy)
    return raw, extra
