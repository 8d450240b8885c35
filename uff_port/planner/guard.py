"""Refuse a training config that cannot fit, before the model loads.

Called by the worker and the trainer (error code `wont_fit`). Pure arithmetic
and a JSON read: no torch, so it answers in milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Final

from uff_port.core.config import Config, resolve_deepspeed_config
from uff_port.planner.arch import ArchError, resolve_arch
from uff_port.planner.estimate import (
    DS_REDUCE_BUCKET,
    Candidate,
    Method,
    Strategy,
    Workload,
    estimate,
)
from uff_port.planner.search import DEFAULT_MARGIN, candidates, judge, overrides_for
from uff_port.planner.sizes import fmt_bytes
from uff_port.protocol.errors import ErrorCode

# Refuse only what the estimate itself puts over the card; suggestions keep a margin.
REFUSE_MARGIN: Final = 0.0


@dataclass
class FitReport:
    """Verdict on one config: `nearest_fit` is a dotted-override map, or None."""

    fits: bool
    estimate: dict[str, Any] | None
    message: str
    nearest_fit: dict[str, Any] | None = None
    checked: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    code: str = ErrorCode.WONT_FIT
    """`wont_fit`, or `not_available` when the config needs a CUDA device and none is visible."""

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "estimate": self.estimate, "message": self.message,
                "nearest_fit": self.nearest_fit, "checked": self.checked}


def workload_of(cfg: Config, on_gpu: bool) -> Workload:
    prec = cfg.training.precision
    if on_gpu:
        p = 4 if prec == "fp32" else 2
    else:
        p = 2 if prec == "bf16" else 4
    return Workload(
        seq_len=max(cfg.data.seq_len, cfg.rl.max_prompt_tokens + cfg.rl.max_new_tokens) if cfg.stage == "rl" else cfg.data.seq_len,
        device="cuda" if on_gpu else "cpu",
        compute_bytes=p,
        lora_r=cfg.lora.r,
        lora_targets=tuple(cfg.lora.target_modules),
        lora_dropout=cfg.lora.dropout,
        attn=cfg.model.attn_implementation,
        double_quant=cfg.quantization.double_quant,
        ds_reduce_bucket=_reduce_bucket(cfg),
        loss=cfg.training.loss,
        packing=cfg.data.packing,
        **_rollout(cfg),
    )


def _rollout(cfg: Config) -> dict[str, int]:
    """The RL stage's generation batch, for the KV-cache term of the estimate."""
    if cfg.stage != "rl":
        return {}
    r = cfg.rl
    return {"rollout_rows": r.prompts_per_step * r.num_generations,
            "rollout_len": r.max_prompt_tokens + r.max_new_tokens}


def _reduce_bucket(cfg: Config) -> int:
    if cfg.distributed.backend != "deepspeed":
        return DS_REDUCE_BUCKET
    value = _ds_zero(cfg.distributed.deepspeed_config).get("reduce_bucket_size")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        else DS_REDUCE_BUCKET


def _ds_zero(path: str | None) -> dict[str, Any]:
    """The `zero_optimization` map of a DeepSpeed JSON; {} when absent or unreadable."""
    if not path:
        return {}
    p, _ = resolve_deepspeed_config(path)
    if p is None:
        return {}
    try:
        zero = json.loads(p.read_text(encoding="utf-8")).get("zero_optimization") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return zero if isinstance(zero, dict) else {}


def _ds_strategy(path: str | None) -> Strategy:
    """ZeRO stage and offload from a DeepSpeed JSON; unreadable means ZeRO-2 (the preset)."""
    zero = _ds_zero(path)
    try:
        stage = int(zero.get("stage", 2))
    except (TypeError, ValueError):
        return "zero2"
    if stage >= 3:
        off = any((zero.get(k) or {}).get("device") in ("cpu", "nvme")
                  for k in ("offload_optimizer", "offload_param"))
        return "zero3_offload" if off else "zero3"
    return "zero2"


def candidate_of(cfg: Config) -> Candidate:
    method: Method = "full" if not cfg.lora.enabled else (
        "qlora" if cfg.quantization.mode == "nf4" else "lora")
    n = cfg.distributed.nproc
    strategy: Strategy
    if cfg.distributed.backend == "deepspeed":
        strategy = _ds_strategy(cfg.distributed.deepspeed_config)
    else:
        strategy = "ddp" if n > 1 else "single"
    ckpt = cfg.model.gradient_checkpointing
    return Candidate(method, strategy, n, bool(ckpt), cfg.training.micro_batch_size,
                     2 if ckpt == "every_other" else 1, cfg.model.offload_activations)


def _distance(a: Candidate, b: Candidate) -> float:
    """How far a suggestion is from what the user asked for (smaller is nearer)."""
    d = abs(math.log2(b.micro_batch / a.micro_batch))
    d += 1.0 if a.grad_ckpt != b.grad_ckpt else (0.5 if a.ckpt_every != b.ckpt_every else 0.0)
    d += 1.0 if a.offload != b.offload else 0.0
    d += 0.0 if a.strategy == b.strategy else (3.0 if b.strategy == "zero3_offload" else 2.0)
    d += 1.0 if a.nproc != b.nproc else 0.0
    d += 3.0 if a.method != b.method else 0.0
    return d


def _nearest(cfg: Config, cur: Candidate, wl: Workload, arch: Any, n_gpus: int,
             gpu_cap: int | None, cpu_cap: int | None) -> dict[str, Any] | None:
    mb_max = max(8, cur.micro_batch)
    best = None
    for cand in candidates(n_gpus, ("lora", "qlora", "full"), mb_max, offload=cpu_cap is not None):
        if cand.micro_batch > cur.micro_batch or (cand.method == "full") != (cur.method == "full"):
            continue  # never suggest a bigger batch, nor switching full <-> adapter training
        s = judge(estimate(arch, cand, wl), gpu_cap, cpu_cap, DEFAULT_MARGIN)
        if not s.fits:
            continue
        key = (_distance(cur, cand), -s.score)
        if best is None or key < best[0]:
            best = (key, cand)
    if best is None:
        return None
    cand = best[1]
    tokens = cfg.training.micro_batch_size * cfg.training.grad_accum_steps * cfg.distributed.nproc
    ov = overrides_for(cand, tokens)  # keep the effective batch
    now = {
        "lora.enabled": cfg.lora.enabled,
        "quantization.mode": cfg.quantization.mode,
        "model.gradient_checkpointing": cfg.model.gradient_checkpointing,
        "model.offload_activations": cfg.model.offload_activations,
        "training.micro_batch_size": cfg.training.micro_batch_size,
        "training.grad_accum_steps": cfg.training.grad_accum_steps,
        "distributed.nproc": cfg.distributed.nproc,
        "distributed.backend": cfg.distributed.backend,
        "distributed.deepspeed_config": cfg.distributed.deepspeed_config,
    }
    if cand.strategy == cur.strategy:  # same launcher: leave backend keys as they are
        for k in ("distributed.backend", "distributed.deepspeed_config"):
            ov.pop(k)
    return {k: v for k, v in ov.items() if now.get(k) != v}


def cuda_need(cfg: Config) -> str | None:
    """Why `cfg` needs a CUDA device (the setting, in words), or None when a CPU will do."""
    # nf4 (bitsandbytes >= 0.48 runs 4-bit layers on a CPU) and DeepSpeed (gloo on CPU) do not
    # need one: both are tested on CPU; only an explicit cuda device and fp16 autocast do.
    if cfg.training.device == "cuda":
        return "training.device: cuda"
    if cfg.training.precision == "fp16":
        return "training.precision: fp16"
    return None


def no_cuda_report(cfg: Config) -> FitReport | None:
    """The refusal of a GPU config on a machine without CUDA: named as such, not as `wont_fit`."""
    need = cuda_need(cfg)
    if need is None:
        return None
    return FitReport(False, None, f"no CUDA device: {need} needs an NVIDIA GPU and none is visible on this "
                     "machine (train on a GPU host, or the tiny preset on CPU)", checked=False,
                     code=ErrorCode.NOT_AVAILABLE)


def check_config(cfg: Config, devices: list[dict[str, Any]]) -> FitReport:
    """Does `cfg` fit on `devices` (NVML records; [] = CPU) and this host's RAM?"""
    import psutil  # light, and only needed here

    if not devices and (no_cuda := no_cuda_report(cfg)) is not None:
        return no_cuda

    try:
        arch = resolve_arch(cfg.model.name_or_path, cfg.model.revision)
    except ArchError as exc:
        return FitReport(True, None, f"fit not checked: {exc}", checked=False)
    on_gpu = bool(devices)
    wl = workload_of(cfg, on_gpu)
    cur = candidate_of(cfg)
    cpu_cap = int(psutil.virtual_memory().total)
    if on_gpu and len(devices) < cur.nproc:
        return FitReport(False, None,
                         f"distributed.nproc: {cur.nproc} processes need {cur.nproc} GPUs, "
                         f"{len(devices)} visible", nearest_fit={"distributed.nproc": len(devices)})
    gpu_cap = min(int(d["memory_total"]) for d in devices[: cur.nproc]) if on_gpu else None
    s = judge(estimate(arch, cur, wl), gpu_cap, cpu_cap, REFUSE_MARGIN)
    est = s.to_dict()
    if s.fits:
        where = f"{fmt_bytes(s.est.gpu_total)} of {fmt_bytes(gpu_cap or 0)} per GPU" if on_gpu else (
            f"{fmt_bytes(s.est.cpu_total)} of {fmt_bytes(cpu_cap)} RAM")
        return FitReport(True, est, f"{cur.label} fits: estimated {where}")
    nearest = _nearest(cfg, cur, wl, arch, len(devices), gpu_cap, cpu_cap)
    parts = []
    if not s.fits_gpu:
        parts.append(f"needs ~{fmt_bytes(s.est.gpu_total)} per GPU, the GPU has {fmt_bytes(gpu_cap or 0)}")
    if not s.fits_cpu:
        parts.append(f"needs ~{fmt_bytes(s.est.cpu_total)} of host RAM, the host has {fmt_bytes(cpu_cap)}")
    hint = f"; nearest config that fits: {nearest}" if nearest else "; no nearby config fits"
    return FitReport(False, est, f"{arch.name} {cur.label} will not fit: " + " and ".join(parts) + hint,
                     nearest_fit=nearest)
