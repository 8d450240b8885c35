"""The LoRA/QLoRA fine-tuning recipe: setup -> train -> save_checkpoint -> cleanup.

Batching: one optimizer step consumes `micro_batch_size * grad_accum_steps`
sequences in total across all ranks (the global batch); each rank takes
`grad_accum_steps / world_size` micro-batches of them. A step's sequences are
fetched before its first micro-step, so an OOM retry (half the micro-batch,
twice the accumulation) and an abort mid-step both see exactly the same data,
and the data cursor saved with a checkpoint is always a step boundary.

Loss: every micro-batch contributes sum(token CE) / N, where N is the number of
target tokens of the whole step on all ranks, so the gradient is that of the
mean token loss of the global batch however it is split.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F

from uff_port import __version__
from uff_port.fsutil import atomic_write_json, fsync_tree, is_disk_full, recover_dir, replace_dir
from uff_port.hashing import tree_manifest
from uff_port.training import dist, zero
from uff_port.training.builtin import resolve_data_path
from uff_port.training.channel import EOF, SIGNAL, Command, Inbox
from uff_port.training.checkpoint_store import CheckpointStore, ResumePoint
from uff_port.training.config import Config, config_hash, resume_hash, resume_view
from uff_port.training.continuity import ContinuityGuard, LossWindow
from uff_port.training.data import IGNORE, PackedStream, Sequence_, collate
from uff_port.training.events import Reporter
from uff_port.training.model import (
    load_model,
    load_tokenizer,
    pick_device,
    pick_precision,
    tokenizer_hash,
    trainable_parameters,
)
from uff_port.training.state import (
    AsyncCheckpointer,
    apply_snapshot,
    capture_rng,
    read_snapshot,
    restore_rng,
    snapshot,
)

EXIT_OK: Final = 0
EXIT_RESUMABLE: Final = 75
EXIT_REFUSED: Final = 3
EXIT_CRASH: Final = 1
INJECT_OOM_ENV: Final = "UFF_PORT_INJECT_OOM_AT_STEP"
INJECT_NONFINITE_ENV: Final = "UFF_PORT_INJECT_NONFINITE_AT_STEP"
# Control words agreed on by all ranks at a step boundary (max wins).
_GO, _CKPT, _STOP_NOSAVE, _STOP, _DISK_FULL = 0, 1, 2, 3, 4


class StopTraining(Exception):
    """Leave the loop: `code` is the exit code, after any checkpoint was made durable."""

    def __init__(self, code: int) -> None:
        self.code = code


class TrainError(Exception):
    """A coded failure. `final`: resuming would only repeat it (never resumable)."""

    def __init__(self, code: str, message: str, resumable: bool = False, *, final: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.resumable, self.final = code, message, resumable and not final, final


class NonFiniteStep(Exception):
    """A step's loss or gradient norm was NaN/Inf; raised before the optimizer moved."""

    def __init__(self, loss: float, grad_norm: float | None) -> None:
        super().__init__(f"loss {loss}, grad norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


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


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != -100)."""
    labels = batch.pop("labels")
    device_type = labels.device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(**batch, use_cache=False).logits
    # fp32 for the softmax: bf16 logits lose the small probabilities.
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


class Trainer:
    """One training job: built from a validated Config, driven by `run()`."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        reporter: Reporter,
        inbox: Inbox,
        resume_from: Path | None = None,
        fresh: bool = False,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.report = reporter
        self.inbox = inbox
        self.resume_from = resume_from
        self.fresh = fresh
        self.rank, self.world = dist.rank(), dist.world_size()
        self.step = 0
        self.tokens_seen = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.state = "starting"
        self.last_checkpoint: str | None = None
        self.loss_window = LossWindow()
        self.guard: ContinuityGuard | None = None
        self.resumed_step: int | None = None
        self.history: list[dict[str, float]] = []
        self._deadline: float | None = None
        self._last_ckpt_time = time.monotonic()
        self._step_seconds = 0.0
        self._ckpt_seconds = 0.0
        self._ckpt_step: int | None = None  # the same on every rank, unlike last_checkpoint
        self._inject_oom = int(os.environ.get(INJECT_OOM_ENV, "0") or 0)
        self._inject_nonfinite = int(os.environ.get(INJECT_NONFINITE_ENV, "0") or 0)
        self.nonfinite_skipped = 0

    # ---- events -------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        self.report.emit(event, **fields)

    def set_state(self, state: str, **fields: Any) -> None:
        self.state = state
        self.emit("state", state=state, step=self.step, **fields)

    # ---- setup --------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        t = cfg.training
        if t.grad_accum_steps % self.world:
            raise TrainError(
                "invalid_config",
                f"training.grad_accum_steps: {t.grad_accum_steps} must be divisible by the number of "
                f"processes ({self.world}) so the global batch stays micro_batch_size * grad_accum_steps",
            )
        self.set_state("loading", world_size=self.world)
        self.device = pick_device(cfg)
        if self.device.type == "cpu" and t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        self.precision = pick_precision(cfg, self.device)
        self._check_fits()
        self.micro = t.micro_batch_size
        self.accum = t.grad_accum_steps // self.world
        torch.manual_seed(t.seed)  # identical LoRA init on every rank
        self.tokenizer = load_tokenizer(cfg)
        self._code_eval_step = -1  # the step eval.suites last ran at
        self.tok_hash = tokenizer_hash(self.tokenizer)
        self.model = load_model(cfg, self.device, self.precision)
        self.params = trainable_parameters(self.model)
        if not self.params:
            raise TrainError("invalid_config", "lora.enabled: false leaves no trainable parameters; enable LoRA")
        self.engine: Any = None  # a DeepSpeed engine, or None for plain torch / DDP
        self.zero_stage = 0  # the ZeRO stage under DeepSpeed; 3 shards the weights too
        self.layout = "torch"
        self.autocast = self.precision.autocast
        if cfg.distributed.backend == "deepspeed":
            self._setup_deepspeed()
        else:
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.params, lr=t.learning_rate, weight_decay=t.weight_decay
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
            self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.use_scaler else None
            self.ddp_model = dist.wrap(self.model, self.device)
        self.data = self._stream("train")
        self.store = CheckpointStore(self.run_dir, keep_last=cfg.checkpoint.keep_last, emit=self.emit)
        if self.rank == 0:
            self._become_writer()
            recover_dir(self.run_dir / "final")  # an export that died mid-swap
        self.checkpointer = AsyncCheckpointer(self.store, emit=self._on_checkpoint_event)
        self.meta = {
            "config_hash": config_hash(cfg),
            "resume_hash": resume_hash(cfg),
            "resume_view": resume_view(cfg),
            "tokenizer_hash": self.tok_hash,
            "versions": _versions(),
            "world_size": self.world,
            "optimizer_layout": self.layout,
        }
        # Dropout differs per rank. Seeded before the resume: a restored checkpoint's RNG
        # state must be the last word, or resumed runs drift from uninterrupted ones.
        torch.manual_seed(t.seed + 1000003 * self.rank)
        self._maybe_resume()
        if t.max_runtime:
            self._deadline = time.monotonic() + t.max_runtime
        self.emit(
            "log",
            level="info",
            message=(
                f"model {cfg.model.name_or_path} on {self.device} ({self.precision.name}), "
                f"{sum(p.numel() for p in self.params)} trainable parameters, world size {self.world}"
            ),
        )

    def _setup_deepspeed(self) -> None:
        """ZeRO-2/3 engine over the LoRA model: it owns the optimizer step, clipping and precision."""
        cfg, t = self.cfg, self.cfg.training
        try:
            deepspeed = zero.import_deepspeed(self.device)
            ds = zero.load_config(
                cfg.distributed.deepspeed_config, micro=self.micro, accum=self.accum, world=self.world,
                max_grad_norm=t.max_grad_norm, precision=self.precision.name,
            )  # fmt: skip
        except zero.ZeroError as exc:
            raise TrainError(exc.code, exc.message) from None
        self.zero_stage = zero.stage_of(ds)
        if self.zero_stage == 3 and cfg.output.merge:
            raise TrainError("invalid_config", "output.merge: not with ZeRO-3 (weights are sharded); "
                             "merge the saved adapter afterwards with peft's merge_and_unload")
        if self.zero_stage == 3 and cfg.quantization.mode != "none":
            raise TrainError("invalid_config", "quantization.mode: 4-bit weights cannot be sharded by ZeRO-3; "
                             "use configs/deepspeed/zero2.json or distributed.backend: ddp")
        dist.init_single()  # a group of one when not under torchrun; no-op otherwise
        self.optimizer = zero.make_optimizer(deepspeed, ds, self.params, t.learning_rate, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        self.engine = zero.initialize(deepspeed, self.model, self.optimizer, self.scheduler, ds)
        self.ddp_model = self.engine
        # bf16/fp16 in the JSON cast the model itself: no autocast on top.
        self.autocast = None
        self.layout = zero.layout(ds, self.world)

    def _become_writer(self) -> None:
        """Hold the run's writer lock for our whole life, before choosing where to resume.

        A predecessor orphaned by a dead worker may still be writing its final
        checkpoint: waiting for it (up to `checkpoint.grace_seconds`) means we
        resume from that checkpoint instead of an older one. Two live trainers
        on one run directory would overwrite each other: the second is refused.
        """
        grace = self.cfg.checkpoint.grace_seconds
        if not self.store.acquire_writer(timeout=grace):
            raise TrainError(
                "busy",
                f"another process (pid {self.store.writer_pid()}) is still writing checkpoints to "
                f"{self.run_dir} after {grace:g} s (checkpoint.grace_seconds); stop it or use another run_dir",
                resumable=True,
            )

    def _check_fits(self) -> None:
        """The memory planner's verdict before the model loads: refuse now, not OOM in an hour."""
        from uff_port.planner.guard import check_config

        devices = []
        if self.device.type == "cuda":
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                devices.append({"index": i, "name": props.name, "memory_total": props.total_memory})
        report = check_config(self.cfg, devices)
        if not report.fits:
            raise TrainError("wont_fit", report.message)
        if self.rank == 0:
            from uff_port.planner.disk import check_disk

            disk = check_disk(self.cfg, self.run_dir)
            if not disk.fits:
                raise TrainError("disk_full", disk.message, resumable=True)

    def _stream(self, split: str) -> PackedStream:
        def bad(name: str, line_no: int, reason: str) -> None:
            self.emit("log", level="warning", code="bad_line", file=name, line=line_no, message=f"{name}:{line_no}: {reason}")

        shared = self.cfg.eval.path if split == "eval" else None  # eval.path: every line is held out
        if shared and not resolve_data_path(shared).is_file():
            raise TrainError("data_not_found", f"eval.path: no such file {shared!r}")
        return PackedStream(
            shared or self.cfg.data.path,
            self.tokenizer,
            self.cfg.data.model_copy(update={"eval_fraction": 1.0}) if shared else self.cfg.data,
            split=split,  # type: ignore[arg-type]
            seed=self.cfg.training.seed,
            rank=self.rank,
            world_size=self.world,
            on_bad_line=bad if (split == "train" and self.rank == 0) else None,
        )

    def _maybe_resume(self) -> None:
        point: Path | None = self.resume_from
        if point is None and not self.fresh:
            found: ResumePoint | None = None
            if self.rank == 0:
                expect = {k: self.meta[k] for k in ("resume_hash", "resume_view", "tokenizer_hash")}
                found = self.store.find_resume_point(expect)  # raises CheckpointMismatch
            path = dist.broadcast_object(str(found.path) if found else None)
            point = Path(path) if path else None
        if point is None:
            return
        snap = read_snapshot(point, rank=self.rank, seed=self.cfg.training.seed)
        if snap.layout != self.layout:
            raise TrainError(
                "checkpoint_mismatch",
                f"{point}: optimizer state saved as {snap.layout}, this run needs {self.layout} "
                "(DeepSpeed shards resume only with the same ZeRO stage and number of processes); "
                "start fresh or use the original distributed settings",
            )
        if self.engine is not None:
            try:
                zero.load(self.engine, point)  # weights, optimizer shards, LR schedule
            except zero.ZeroError as exc:
                raise TrainError(exc.code, exc.message) from None
            restore_rng(snap.rng)
        else:
            apply_snapshot(snap, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        self.data.load_state_dict(snap.data_cursor)
        c = snap.counters
        self.step = snap.step
        self.tokens_seen = int(c.get("tokens_seen", 0))
        self.loss = c.get("loss")
        self.nonfinite_skipped = int(c.get("nonfinite_skipped", 0))
        self.history = list(c.get("history", []))
        # An OOM back-off is kept: the same hardware would fail the same way again.
        if int(c.get("world_size", self.world)) == self.world and c.get("micro_batch_size"):
            self.micro, self.accum = int(c["micro_batch_size"]), int(c["grad_accum"])
        self.loss_window = LossWindow.from_counters(c)
        self.guard = ContinuityGuard(self.loss_window.values(), snap.step, emit=self.emit)
        self.resumed_step = snap.step
        self._ckpt_step = snap.step
        self.last_checkpoint = str(point)
        self.emit("log", level="info", message=f"resumed from {point} at step {snap.step}", resumed_from=snap.step)

    # ---- checkpoints --------------------------------------------------------
    def _on_checkpoint_event(self, event: str, **fields: Any) -> None:
        if event == "checkpoint":
            self.last_checkpoint = fields.get("path")
            self._ckpt_seconds = max(self._ckpt_seconds, float(fields.get("seconds", 0.0)))
        self.emit(event, **fields)

    def _counters(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "loss": self.loss,
            "micro_batch_size": self.micro,
            "grad_accum": self.accum,
            "world_size": self.world,
            "history": self.history[-2000:],
            "nonfinite_skipped": self.nonfinite_skipped,
            **{"loss_window": self.loss_window.to_counters()},
        }

    def save_checkpoint(self, *, wait: bool) -> str | None:
        """Snapshot at a step boundary (collective), write in the background on rank 0.

        Under DeepSpeed every rank first writes its optimizer shard into the
        staging directory rank 0 opened; the commit then covers all of them.
        """
        staging: Path | None = None
        if self.engine is not None:
            if self.rank == 0:
                self.checkpointer.wait()  # one save at a time, and the sweep done before we stage
                staging = self.store.begin(self.step)
            staging = Path(dist.broadcast_object(str(staging) if staging else None))
            zero.save(self.engine, staging)
        with zero.gathered(self.params, self.zero_stage):
            snap = snapshot(
                model=self.model,
                optimizer=None if self.engine is not None else self.optimizer,
                scheduler=None if self.engine is not None else self.scheduler,
                scaler=self.scaler,
                data_cursor=self.data.state_dict(),
                counters=self._counters(),
                step=self.step,
                rank=self.rank,
                world_size=self.world,
            )
        snap.layout, snap.staging = self.layout, staging
        self._last_ckpt_time = time.monotonic()
        self._ckpt_step = self.step
        if self.rank != 0:
            return None
        self.checkpointer.save(snap, {**self.meta, "tokens_seen": self.tokens_seen})
        if not wait:
            return None
        point = self.checkpointer.wait(self.cfg.checkpoint.grace_seconds)
        if point is None:
            err = self.checkpointer.last_error
            if err is not None and self._is_disk_full(err):
                raise TrainError("disk_full", self._disk_full_message(), resumable=True)
            why = f": {type(err).__name__}: {err}" if err is not None else ""
            raise TrainError("checkpoint_failed", f"checkpoint of step {self.step} did not become durable{why}",
                             resumable=True)
        return str(point.path)

    def _checkpoint_hit_full_disk(self) -> bool:
        """Did the last background checkpoint fail for want of space? (rank 0 writes them)"""
        err = self.checkpointer.last_error if self.rank == 0 else None
        return err is not None and self._is_disk_full(err)

    def _is_disk_full(self, err: BaseException) -> bool:
        """Said by the error, or by the disk itself (some writers fail without saying why)."""
        from uff_port.planner.disk import checkpoint_bytes, free_bytes

        return is_disk_full(err) or free_bytes(self.run_dir) < (checkpoint_bytes(self.cfg) or 0) + 2**20

    def _disk_full_message(self) -> str:
        return (f"no space left on the disk of {self.run_dir}: the checkpoint of step {self.step} could not be "
                f"written; the last durable checkpoint is {self.last_checkpoint}. Free some space and send the "
                "same train again to resume from it")

    def _checkpoint_of_this_step(self) -> str | None:
        """A durable checkpoint of the current step: the one already made (periodic, or the
        one resumed from) when it succeeded, else a new one. Never the same step twice."""
        redo = self._ckpt_step != self.step
        if not redo and self.rank == 0:
            point = self.checkpointer.wait(self.cfg.checkpoint.grace_seconds)
            redo = self.checkpointer.saves > 0 and (point is None or point.step != self.step)
        # Rank 0 alone knows whether its write failed; saving is a collective.
        if dist.agree_max(int(redo), self.device):
            return self.save_checkpoint(wait=True)
        return self.last_checkpoint if self.rank == 0 else None

    # ---- commands -----------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "max_steps": self.cfg.training.max_steps,
            "loss": self.loss,
            "last_checkpoint": self.last_checkpoint,
            "state": self.state,
        }

    def _poll(self, pending: list[Command]) -> int:
        """Answer status at once; return the strongest control word asked for."""
        want = _CKPT if pending else _GO  # a checkpoint asked for mid-step is still owed
        for c in self.inbox.poll():
            if c.cmd == "status":
                self.report.reply(c.id, self._status())
            elif c.cmd == "checkpoint":
                pending.append(c)
                want = max(want, _CKPT)
            elif c.cmd == "stop":
                pending.append(c)
                want = max(want, _STOP if c.args.get("checkpoint", True) else _STOP_NOSAVE)
            elif c.cmd in (EOF, SIGNAL):
                why = "channel closed" if c.cmd == EOF else f"signal {c.args.get('signum')}"
                self.emit("log", level="warning", message=f"{why}: checkpointing and stopping")
                want = max(want, _STOP)
            else:
                self.report.reply(c.id, error={"code": "unknown_command", "message": f"trainer does not know {c.cmd!r}"})
        return want

    def _act(self, want: int, pending: list[Command]) -> None:
        """Carry out an agreed control word at a step boundary."""
        if want == _GO:
            return
        path: str | None = None
        if want in (_CKPT, _STOP):
            self.set_state("checkpointing")
            path = self._checkpoint_of_this_step()
        for c in pending:
            if c.cmd == "checkpoint":
                self.report.reply(c.id, {"step": self.step, "path": path})
            elif c.cmd == "stop":
                self.report.reply(c.id, {"step": self.step, "checkpoint": path})
        pending.clear()
        if want in (_STOP, _STOP_NOSAVE):
            self.set_state("stopped", checkpoint=path)
            raise StopTraining(EXIT_RESUMABLE)
        self.set_state("training")

    # ---- the loop -----------------------------------------------------------
    def train(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        if self.step >= t.max_steps:
            return self._finish()
        self.set_state("training", resumed_from=self.resumed_step)
        pending: list[Command] = []
        window_t0, window_tokens = time.monotonic(), 0
        while self.step < t.max_steps:
            want = self._poll(pending)
            if self._should_checkpoint():
                want = max(want, _CKPT)
            if self._near_deadline():
                self.emit("log", level="warning", message="training.max_runtime nearly spent: checkpointing")
                want = max(want, _STOP)
            # Clocks and signals are per rank: all ranks do what the most urgent one asks.
            if self._checkpoint_hit_full_disk():
                want = _DISK_FULL
            want = dist.agree_max(want, self.device)
            if want == _DISK_FULL:
                # Training on would only pile up steps that no checkpoint can keep. The last
                # durable checkpoint is intact (commits are atomic): resumable once space is freed.
                raise TrainError("disk_full", self._disk_full_message(), resumable=True)
            if want == _CKPT and not pending:  # periodic: do not block the loop
                self.save_checkpoint(wait=False)
            else:
                self._act(want, pending)
            t0 = time.monotonic()
            self._step_cursor = self.data.state_dict()
            seqs = self.data.take(self.micro * self.accum)
            if not seqs:
                raise TrainError("no_data", "data.path: the training stream ended unexpectedly")
            try:
                loss, n_tokens, grad_norm = self._step(seqs, pending)
            except NonFiniteStep as bad:
                self._skip_or_fail(bad)  # the batch is dropped; the step is tried on the next one
                continue
            self.step += 1
            self.tokens_seen += n_tokens
            window_tokens += n_tokens
            self.loss = loss
            self.loss_window.add(loss)
            if self.guard is not None:
                self.guard.observe(loss)
            self._step_seconds = time.monotonic() - t0
            now = time.monotonic()
            tps = window_tokens / max(now - window_t0, 1e-9)
            self.history.append({"step": self.step, "loss": loss, "tokens_per_s": tps})
            if self.report.progress(
                t.progress_every_seconds,
                force=self.step == t.max_steps,
                step=self.step,
                max_steps=t.max_steps,
                loss=loss,
                lr=self.scheduler.get_last_lr()[0],
                tokens_per_s=tps,
                grad_norm=grad_norm,
                tokens_seen=self.tokens_seen,
                epoch=self.data.epoch,
                micro_batch_size=self.micro,
                grad_accum=self.accum,
                step_seconds=self._step_seconds,
            ):
                window_t0, window_tokens = now, 0
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self.evaluate()
            self._code_eval(pending, final=False)
        return self._finish()

    def _skip_or_fail(self, bad: NonFiniteStep) -> None:
        """Drop a non-finite batch while `training.skip_nonfinite_steps` allows, else fail.

        The weights never saw the bad gradient (the check runs before the optimizer
        step), so the last checkpoint stays good. The failure is final: an exact
        resume would meet the same batch again; raising the budget is the way past it.
        """
        budget = self.cfg.training.skip_nonfinite_steps
        where = f"step {self.step + 1}: loss {bad.loss}, grad norm {bad.grad_norm}"
        if self.nonfinite_skipped < budget:
            self.nonfinite_skipped += 1
            self.emit(
                "log", level="warning", code="nonfinite_skipped", step=self.step + 1,
                message=f"non-finite {where}: batch skipped ({self.nonfinite_skipped} of {budget})",
                skipped=self.nonfinite_skipped,
            )  # fmt: skip
            return
        raise TrainError(
            "non_finite",
            f"non-finite {where}; training stopped, the last checkpoint ({self.last_checkpoint}) is the last "
            "good state. Lower training.learning_rate, check the data, or set training.skip_nonfinite_steps",
            final=True,
        )

    def _should_checkpoint(self) -> bool:
        c = self.cfg.checkpoint
        if self.step == 0 or self.step == self.resumed_step:
            return False
        if c.every_steps and self.step % c.every_steps == 0:
            return True
        return bool(c.every_seconds and time.monotonic() - self._last_ckpt_time >= c.every_seconds)

    def _near_deadline(self) -> bool:
        if self._deadline is None:
            return False
        # Leave room for one more step plus a checkpoint, with a margin.
        reserve = 2.0 * self._step_seconds + 2.0 * self._ckpt_seconds + 5.0
        return time.monotonic() + reserve >= self._deadline

    def _step(self, seqs: list[Sequence_], pending: list[Command]) -> tuple[float, int, float | None]:
        """One optimizer step over `seqs`; on OOM retry with half the micro-batch."""
        rng = capture_rng()
        while True:
            try:
                return self._try_step(seqs, pending, rng)
            except torch.OutOfMemoryError as exc:
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.micro <= 1 or self.world > 1 or self.engine is not None:
                    raise TrainError(
                        "out_of_memory",
                        f"out of memory at step {self.step + 1} with micro_batch_size {self.micro}: {exc}. "
                        "Lower data.seq_len, enable model.gradient_checkpointing or quantization.mode: nf4",
                    ) from None
                self.micro //= 2
                self.accum *= 2
                restore_rng(rng)  # the retry must draw the same dropout masks
                self.emit(
                    "log",
                    level="warning",
                    code="oom_backoff",
                    message=f"out of memory at step {self.step + 1}: retrying with micro_batch_size {self.micro}, "
                    f"grad_accum {self.accum} (same global batch)",
                    micro_batch_size=self.micro,
                    grad_accum=self.accum,
                )

    def _try_step(self, seqs: list[Sequence_], pending: list[Command], rng: dict[str, Any]) -> tuple[float, int, float | None]:
        model = self.ddp_model
        model.train()
        local_tokens = sum(s.n_targets for s in seqs)
        total = dist.all_reduce_sum(torch.tensor(float(local_tokens), device=self.device))
        denom = max(float(total), 1.0)
        chunks = [seqs[i : i + self.micro] for i in range(0, len(seqs), self.micro)]
        if self.engine is not None:
            return self._try_step_deepspeed(chunks, denom, total)
        loss_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(chunks):
            if self.world == 1 and i > 0:
                want = self._poll(pending)
                if want in (_STOP, _STOP_NOSAVE):
                    # Abandon the half-done step: the checkpoint is the last boundary,
                    # with the RNG as it was there, so resume replays this step exactly.
                    self.optimizer.zero_grad(set_to_none=True)
                    restore_rng(rng)
                    self.data.load_state_dict(self._step_cursor)
                    self._act(want, pending)
            if self._inject_oom and self.step + 1 == self._inject_oom:
                self._inject_oom = 0  # once: the retry must succeed
                raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={self._inject_oom}")
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.data.pad_id).items()}
            with dist.no_sync_unless(model, last=i == len(chunks) - 1):
                s = token_loss_sum(model, batch, self.autocast)
                if self._inject_nonfinite and self.step + 1 == self._inject_nonfinite:
                    self._inject_nonfinite = 0  # once: a skipped batch is followed by good ones
                    s = s * float("nan")
                # DDP averages gradients over ranks: scale by world so the sum is over all tokens.
                scaled = s * (self.world / denom)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += s.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # Checked before the optimizer moves, so a bad batch never reaches the weights.
        # Every rank sees the same reduced loss and gradients, so all decide alike.
        global_sum = float(dist.all_reduce_sum(loss_sum))
        if self.cfg.training.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        # fp16's scaler skips overflowing steps itself (and lowers its scale): only the loss counts then.
        if not math.isfinite(global_sum) or (self.scaler is None and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(global_sum / denom, grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_sum / denom, int(total), grad_norm

    def _try_step_deepspeed(
        self, chunks: list[list[Sequence_]], denom: float, total: torch.Tensor
    ) -> tuple[float, int, float | None]:
        """The engine reduces (and averages over ranks) at the last micro-batch, then steps."""
        engine = self.engine
        loss_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(chunks):
            engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.data.pad_id).items()}
            s = token_loss_sum(engine, batch, self.autocast)
            # Ranks are averaged like DDP; our own token count does the accumulation scaling.
            engine.backward(s * (self.world / denom), scale_wrt_gas=False)
            engine.step()
            loss_sum += s.detach().float()
        norm = engine.get_global_grad_norm()
        global_sum = float(dist.all_reduce_sum(loss_sum))
        if not math.isfinite(global_sum):
            # The engine has stepped already: no skipping here, the run stops (nothing is saved).
            raise TrainError("non_finite", f"non-finite loss at step {self.step + 1} under DeepSpeed; the last "
                             f"checkpoint ({self.last_checkpoint}) is the last good state", final=True)
        return global_sum / denom, int(total), float(norm) if norm is not None else None

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss on the held-out split (loss sums accumulate, never logits)."""
        if self.cfg.data.eval_fraction <= 0 and not self.cfg.eval.path:
            return None
        self.set_state("evaluating")
        model = self.model
        model.eval()
        stream = self._stream("eval")
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for _ in range(self.cfg.eval.max_batches):
            seqs = stream.take(self.micro)
            if not seqs:
                break
            batch = {k: v.to(self.device) for k, v in collate(seqs, stream.pad_id).items()}
            count += sum(s.n_targets for s in seqs)
            loss_sum += token_loss_sum(model, batch, self.autocast).float()
        stream.close()
        total = float(dist.all_reduce_sum(count))
        value = float(dist.all_reduce_sum(loss_sum)) / total if total else None
        self.eval_loss = value
        ppl = math.exp(min(value, 50.0)) if value is not None else None
        self.emit("eval", step=self.step, loss=value, perplexity=ppl, tokens=int(total))
        if self.history:
            self.history[-1]["eval_loss"] = value if value is not None else float("nan")
        self.set_state("training")
        return value

    def _code_eval(self, pending: list[Command], final: bool) -> None:
        """eval.suites (uff_port.eval.training): a stop abandons it, then stops as usual."""
        if not self.cfg.eval.suites or self.rank != 0 or (final and self._code_eval_step == self.step):
            return
        from uff_port.eval.training import due, run_suites

        if not any(due(s, self.step, self.cfg.eval.every_steps, final) for s in self.cfg.eval.suites):
            return
        if self.zero_stage == 3:  # sharded parameters: generation would need them gathered
            self.emit("log", level="warning", message="eval.suites skipped: not supported with zero_stage 3")
            return
        self._code_eval_step = self.step
        self.set_state("evaluating")
        want = run_suites(self.cfg.eval.suites, self.run_dir, self.model, self.tokenizer, self.device,
                          self.step, self.cfg.eval.every_steps, final, self.emit,
                          lambda: self._poll(pending), _STOP_NOSAVE, self.eval_loss)
        self._act(want, pending)
        self.set_state("training")

    # ---- the end ------------------------------------------------------------
    def _finish(self) -> int:
        if self.cfg.eval.every_steps is None or self.step % (self.cfg.eval.every_steps or 1):
            self.evaluate()
        self._code_eval([], final=True)
        self.set_state("saving")
        if self._ckpt_step != self.step:  # a collective: every rank decides alike
            self.save_checkpoint(wait=True)
        elif self.rank == 0:
            self.checkpointer.wait(self.cfg.checkpoint.grace_seconds)
        final = None
        if self.cfg.output.save_final:
            with zero.gathered(self.params, self.zero_stage):  # every rank, under ZeRO-3
                final = self.save_final() if self.rank == 0 else None
        self.emit(
            "finished",
            step=self.step,
            max_steps=self.cfg.training.max_steps,
            loss=self.loss,
            eval_loss=self.eval_loss,
            final=str(final) if final else None,
            last_checkpoint=self.last_checkpoint,
            tokens_seen=self.tokens_seen,
        )
        self.state = "finished"
        return EXIT_OK

    def save_final(self) -> Path:
        """Adapter (and optional merged model) to RUN_DIR/final, committed by one rename."""
        final = self.run_dir / "final"
        tmp = self.run_dir / f".final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_cfg = getattr(self.model, "peft_config", {}).get("default")
        if peft_cfg is not None:
            # Record the configured id, not this machine's cache path: the same training on
            # two sites must give the same adapter files (and so the same artifact id).
            peft_cfg.base_model_name_or_path = self.cfg.model.name_or_path
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if self.cfg.output.merge and hasattr(self.model, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(self.model).merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "merged")
        atomic_write_json(
            tmp / "manifest.json",
            {
                "step": self.step,
                "base_model": self.cfg.model.name_or_path,
                **{k: self.meta[k] for k in ("config_hash", "tokenizer_hash", "versions")},
                "files": tree_manifest(tmp, exclude=["manifest.json"]),
            },
        )
        fsync_tree(tmp)  # every file of the export, before the rename makes it `final`
        replace_dir(tmp, final)
        self.emit("log", level="info", message=f"final adapter saved to {final}", path=str(final))
        return final

    def settle(self) -> None:
        """Let a checkpoint in flight become durable (before a `failed` says what is resumable)."""
        if self.rank == 0 and hasattr(self, "checkpointer"):
            self.checkpointer.wait(self.cfg.checkpoint.grace_seconds)

    def cleanup(self) -> None:
        self.settle()
        if hasattr(self, "data"):
            self.data.close()


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "uff_port": __version__}
