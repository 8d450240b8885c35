"""Refuse a training config that cannot fit, before the model loads.

Called by the worker and the trainer (error code `wont_fit`). Pure arithmetic
and a JSON read: no torch, so it answers in milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Final

from uff_port.core.config import Config, ConfigError, resolve_deepspeed_config, validate_config
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
    details: dict[str, Any] = {}
    rollout_note = ""
    if cfg.stage == "rl":
        fix = _rollout_fix(cfg, cur, wl, arch, len(devices), gpu_cap, cpu_cap, nearest)
        if fix is not None:
            details["rollout"] = fix
            rollout_note = "; " + fix["message"]
            if fix["overrides"] is not None:
                nearest = fix["overrides"]
    hint = f"; nearest config that fits: {nearest}" if nearest else "; no nearby config fits"
    return FitReport(False, est, f"{arch.name} {cur.label} will not fit: " + " and ".join(parts) + rollout_note + hint,
                     nearest_fit=nearest, details=details)


# ---- the RL stage's generation batch ----------------------------------------------------


@dataclass(frozen=True)
class RolloutLimit:
    """The largest generation batch one update shape fits with (margin kept)."""

    rows: int
    """Completions generated at once (prompts_per_step x num_generations) that fit; 0 = none."""
    num_generations: int | None
    """The largest G at the config's prompts_per_step (None when below 2)."""
    prompts_per_step: int | None
    """The largest prompts_per_step at the config's G (None when below 1)."""


def rollout_limit(arch: Any, cand: Candidate, wl: Workload, gpu_cap: int | None, cpu_cap: int | None,
                  prompts_per_step: int, num_generations: int, margin: float = DEFAULT_MARGIN) -> RolloutLimit:
    """Largest rows <= wl.rollout_rows that fit (the estimate grows with rows: a bisection).

    The update's micro-batch is capped at the rows (a generation batch smaller than
    `training.micro_batch_size` is refused at validation), which only lowers the estimate.
    """

    def fits(rows: int) -> bool:
        c = replace(cand, micro_batch=min(cand.micro_batch, rows))
        return judge(estimate(arch, c, replace(wl, rollout_rows=rows)), gpu_cap, cpu_cap, margin).fits

    lo, hi = 0, wl.rollout_rows  # fits(lo) is assumed, fits(hi + 1) is not asked
    if fits(hi):
        lo = hi
    else:
        while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    g = lo // prompts_per_step
    return RolloutLimit(lo, g if g >= 2 else None, min(prompts_per_step, lo // num_generations) or None)


def rollout_overrides(limit: RolloutLimit, prompts_per_step: int, num_generations: int,
                      micro_batch: int) -> dict[str, Any] | None:
    """The smallest change to the generation batch that fits: fewer prompts per batch first
    (the group size G, which the advantages are normalised over, is kept), then a smaller G
    at one prompt; None when not even one prompt with G = 2 fits."""
    if limit.rows >= prompts_per_step * num_generations:
        return {}
    if limit.prompts_per_step:
        ov: dict[str, Any] = {"rl.prompts_per_step": limit.prompts_per_step}
    elif limit.rows >= 2:
        ov = {"rl.prompts_per_step": 1, "rl.num_generations": limit.rows}
    else:
        return None
    rows = ov["rl.prompts_per_step"] * ov.get("rl.num_generations", num_generations)
    if micro_batch > rows:
        ov["training.micro_batch_size"] = rows
    return ov


def _rollout_fix(cfg: Config, cur: Candidate, wl: Workload, arch: Any, n_gpus: int, gpu_cap: int | None,
                 cpu_cap: int | None, nearest: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the generation batch must shrink to, with the config's update shape when that
    alone fits, else with the nearest update shape that fits without the rollout."""
    r = cfg.rl
    update_only = replace(wl, rollout_rows=0)
    if judge(estimate(arch, cur, update_only), gpu_cap, cpu_cap, DEFAULT_MARGIN).fits:
        cand, base = cur, {}
    else:
        base = _nearest(cfg, cur, update_only, arch, n_gpus, gpu_cap, cpu_cap) or {}
        if not base:
            return None
        try:
            cand = candidate_of(validate_config(cfg.to_dict(), base))
        except ConfigError:  # e.g. more processes, which the RL stage refuses
            return None
    limit = rollout_limit(arch, cand, wl, gpu_cap, cpu_cap, r.prompts_per_step, r.num_generations)
    ov = rollout_overrides(limit, r.prompts_per_step, r.num_generations, cand.micro_batch)
    if ov == {}:
        return None  # the rollout is not what breaks it: the update shape's own change suffices
    rows = r.prompts_per_step * r.num_generations
    if ov is None:
        msg = (f"the rollout does not fit even at 1 prompt x G 2 ({r.max_prompt_tokens} + {r.max_new_tokens} "
               "tokens per row): lower rl.max_new_tokens or rl.max_prompt_tokens")
    else:
        largest = []
        if limit.num_generations:
            largest.append(f"rl.num_generations {limit.num_generations} (at {r.prompts_per_step} prompts per step)")
        if limit.prompts_per_step:
            largest.append(f"rl.prompts_per_step {limit.prompts_per_step} (at G {r.num_generations})")
        if not largest:
            largest.append(f"rl.num_generations {limit.rows} at 1 prompt per step")
        msg = (f"the rollout ({r.prompts_per_step} prompts x G {r.num_generations} = {rows} completions of up to "
               f"{r.max_prompt_tokens} + {r.max_new_tokens} tokens) fits with at most {limit.rows} "
               "completions at once: largest "
               + " or ".join(largest))
    return {"message": msg, "rows": limit.rows, "num_generations": limit.num_generations,
            "prompts_per_step": limit.prompts_per_step, "overrides": None if ov is None else {**base, **ov}}
