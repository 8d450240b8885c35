"""Step engines: how one optimizer step is computed, behind one small interface.

A recipe owns the data, the loop, the control words and checkpoint policy; an
engine owns the optimizer, the LR schedule and the arithmetic of a step:

- `TorchEngine`: plain torch, DDP-wrapped under torchrun (QLoRA's path).
- `DeepSpeedEngine`: a ZeRO-2/3 engine that owns the step, clipping and precision.

Both take a step as micro-batches (`chunks`) whose loss sums are divided by
`denom`, the target tokens of the whole step on all ranks, so the gradient is
that of the mean token loss of the global batch however it is split.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch

from uff_port.core.config import Config
from uff_port.training import dist, zero
from uff_port.training.data import Sequence_, collate
from uff_port.training.errors import NonFiniteStep, TrainError
from uff_port.training.loss import LossMode, loss_sum
from uff_port.training.state import TrainingSnapshot, apply_snapshot, check_snapshot, restore_rng

INJECT_OOM_ENV: Final = "UFF_PORT_INJECT_OOM_AT_STEP"
INJECT_NONFINITE_ENV: Final = "UFF_PORT_INJECT_NONFINITE_AT_STEP"

StepResult = tuple[float, int, float | None]
"""(mean token loss of the step, target tokens on all ranks, gradient norm or None)."""


def lr_lambda(cfg: Config):  # noqa: ANN201 - a closure for LambdaLR
    warm, total, kind = cfg.training.warmup_steps, cfg.training.max_steps, cfg.training.lr_scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def flattens(cfg: Config) -> bool:
    """Packed micro-batches go as one row: flash attention's varlen path needs batch size 1."""
    return cfg.data.packing and cfg.model.attn_implementation.startswith("flash_attention")


def activation_offload(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """`model.offload_activations`: tensors saved for backward wait in pinned host memory (CUDA only)."""
    if cfg.model.offload_activations and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None,
                   mode: LossMode = "full") -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != -100); `training.loss` picks how."""
    return loss_sum(model, batch, autocast, mode)


class StepEngine:
    """What a recipe needs of an engine. Attributes are set by each engine's constructor."""

    layout: str
    """How a checkpoint's optimizer state is laid out; a resume needs the same."""
    zero_stage: int
    """3 when the weights are sharded (gather them to read them whole)."""
    module: Any
    """What the forward pass runs through (the DDP wrapper, the DeepSpeed engine)."""
    autocast: torch.dtype | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    can_back_off: bool
    """An OOM may be retried with half the micro-batch (the micro-batch is not fixed in the engine)."""
    writes_shards: bool
    """Every rank writes its own optimizer shard into the checkpoint being staged."""

    def step(
        self, chunks: list[list[Sequence_]], denom: float, total: torch.Tensor, *, pad_id: int, step_no: int,
        between: Callable[[int], None],
    ) -> StepResult:
        """One optimizer step; `between(i)` runs before micro-batch i > 0 (control may abandon the step)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def check(self, snap: TrainingSnapshot) -> None:
        """Raise ValueError if a checkpoint's state does not fit this engine (touching nothing)."""

    def restore(self, point: Path, snap: TrainingSnapshot) -> None:
        """Load weights, optimizer and schedule from a checkpoint."""
        raise NotImplementedError

    def save_shards(self, staging: Path) -> None:
        """Write this rank's part of the checkpoint into `staging` (engines with `writes_shards`)."""

    def snapshot_parts(self) -> dict[str, Any]:
        """The optimizer, scheduler and scaler the trainer's snapshot holds (None: the engine saves its own)."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}


class TorchEngine(StepEngine):
    def __init__(self, cfg: Config, model: Any, params: list[torch.nn.Parameter], device: torch.device,
                 precision: Any, world: int) -> None:
        t = cfg.training
        self.cfg, self.model, self.params, self.device, self.world = cfg, model, params, device, world
        self.layout, self.zero_stage = "torch", 0
        self.can_back_off, self.writes_shards = True, False
        self.autocast = precision.autocast
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = torch.amp.GradScaler(device.type) if precision.use_scaler else None
        self.module = dist.wrap(model, device)
        self._inject_oom = int(os.environ.get(INJECT_OOM_ENV, "0") or 0)
        self._inject_nonfinite = int(os.environ.get(INJECT_NONFINITE_ENV, "0") or 0)

    def step(
        self, chunks: list[list[Sequence_]], denom: float, total: torch.Tensor, *, pad_id: int, step_no: int,
        between: Callable[[int], None],
    ) -> StepResult:
        model = self.module
        loss_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(chunks):
            if i > 0:
                between(i)
            if self._inject_oom and step_no == self._inject_oom:
                self._inject_oom = 0  # once: the retry must succeed
                raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={step_no}")
            batch = {k: v.to(self.device) for k, v in collate(chunk, pad_id, flatten=flattens(self.cfg)).items()}
            with dist.no_sync_unless(model, last=i == len(chunks) - 1):
                with activation_offload(self.cfg, self.device):
                    s = token_loss_sum(model, batch, self.autocast, self.cfg.training.loss)
                if self._inject_nonfinite and step_no == self._inject_nonfinite:
                    self._inject_nonfinite = 0  # once: a skipped batch is followed by good ones
                    s = s * float("nan")
                # DDP averages gradients over ranks: scale by world so the sum is over all tokens.
                scaled = s * (self.world / denom)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += s.detach()
        # Every rank sees the same reduced loss and gradients, so all decide alike.
        global_sum = float(dist.all_reduce_sum(loss_sum))
        grad_norm = self.apply_gradients(global_sum / denom)
        return global_sum / denom, int(total), grad_norm

    def apply_gradients(self, loss: float) -> float:
        """Unscale, clip, check, step: the gradient is in `.grad`; returns its norm.

        Checked before the optimizer moves, so a bad batch never reaches the weights
        (NonFiniteStep, gradients dropped). fp16's scaler skips overflowing steps itself
        (and lowers its scale): only the loss counts then.
        """
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.training.max_grad_norm
        if max_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(loss, grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def check(self, snap: TrainingSnapshot) -> None:
        check_snapshot(snap, model=self.model, optimizer=self.optimizer)

    def restore(self, point: Path, snap: TrainingSnapshot) -> None:
        apply_snapshot(snap, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        reschedule(self.scheduler)


def reschedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the restored step's learning rate from this config's schedule.

    The optimizer state holds the rate the saved schedule gave; a resume with a larger
    `training.max_steps` (resume-neutral) would run its first step at that rate (0 at the
    end of a cosine). The same expression LambdaLR uses, so an unchanged config keeps its bits.
    """
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports before the next step


class DeepSpeedEngine(StepEngine):
    """ZeRO-2/3 engine over the LoRA model: it owns the optimizer step, clipping and precision."""

    def __init__(self, cfg: Config, model: Any, params: list[torch.nn.Parameter], device: torch.device,
                 precision: Any, world: int, *, micro: int, accum: int) -> None:
        t = cfg.training
        self.cfg, self.device, self.world = cfg, device, world
        try:
            deepspeed = zero.import_deepspeed(device)
            ds = zero.load_config(
                cfg.distributed.deepspeed_config, micro=micro, accum=accum, world=world,
                max_grad_norm=t.max_grad_norm, precision=precision.name,
            )  # fmt: skip
        except zero.ZeroError as exc:
            raise TrainError(exc.code, exc.message) from None
        # ZeRO-3 with output.merge or 4-bit weights is refused by the config's validation.
        self.zero_stage = zero.stage_of(ds)
        # ZeRO-3 partitions lm_head's weight outside its module's call: the chunked loss would
        # gather it again per chunk in backward (untested here), so ZeRO-3 keeps the full loss.
        self.loss_mode: LossMode = t.loss if self.zero_stage < 3 else "full"
        self.can_back_off, self.writes_shards = False, True  # the micro-batch is fixed in the engine
        dist.init_single()  # a group of one when not under torchrun; no-op otherwise
        self.optimizer = zero.make_optimizer(deepspeed, ds, params, t.learning_rate, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        self.engine = zero.initialize(deepspeed, model, self.optimizer, self.scheduler, ds)
        self.module = self.engine
        # bf16/fp16 in the JSON cast the model itself: no autocast on top.
        self.autocast = None
        self.layout = zero.layout(ds, world)

    def step(
        self, chunks: list[list[Sequence_]], denom: float, total: torch.Tensor, *, pad_id: int, step_no: int,
        between: Callable[[int], None],
    ) -> StepResult:
        """The engine reduces (and averages over ranks) at the last micro-batch, then steps."""
        engine = self.engine
        loss_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(chunks):
            engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            batch = {k: v.to(self.device) for k, v in collate(chunk, pad_id, flatten=flattens(self.cfg)).items()}
            with activation_offload(self.cfg, self.device):
                s = token_loss_sum(engine, batch, self.autocast, self.loss_mode)
            # Ranks are averaged like DDP; our own token count does the accumulation scaling.
            engine.backward(s * (self.world / denom), scale_wrt_gas=False)
            engine.step()
            loss_sum += s.detach().float()
        norm = engine.get_global_grad_norm()
        global_sum = float(dist.all_reduce_sum(loss_sum))
        if not math.isfinite(global_sum):
            # The engine has stepped already: no skipping here, the run stops (nothing is saved).
            raise NonFiniteStep(global_sum / denom, float(norm) if norm is not None else None, stepped=True)
        return global_sum / denom, int(total), float(norm) if norm is not None else None

    def restore(self, point: Path, snap: TrainingSnapshot) -> None:
        try:
            zero.load(self.engine, point)  # weights, optimizer shards, LR schedule
        except zero.ZeroError as exc:
            raise TrainError(exc.code, exc.message) from None
        restore_rng(snap.rng)

    def save_shards(self, staging: Path) -> None:
        zero.save(self.engine, staging)

    def snapshot_parts(self) -> dict[str, Any]:
        return {"optimizer": None, "scheduler": None, "scaler": None}


def make_engine(cfg: Config, model: Any, params: list[torch.nn.Parameter], device: torch.device, precision: Any,
                world: int, *, micro: int, accum: int) -> StepEngine:
    if cfg.distributed.backend == "deepspeed":
        return DeepSpeedEngine(cfg, model, params, device, precision, world, micro=micro, accum=accum)
    return TorchEngine(cfg, model, params, device, precision, world)
