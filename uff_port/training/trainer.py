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

The recipe keeps the spine and the policy (when to checkpoint, evaluate, stop);
what it shares with any other recipe lives beside it: the control words
(`control`), the step engines, plain torch/DDP or DeepSpeed (`engines`), the
checkpoint snapshot (`state`, over `core.checkpoint_store`) and the final
export (`export`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from uff_port import __version__
from uff_port.core import layout
from uff_port.core.checkpoint_store import CheckpointStore, CheckpointUnloadable, ResumePoint
from uff_port.core.config import Config, config_hash, resume_hash, resume_view
from uff_port.core.exits import ExitCode
from uff_port.fsutil import UNSAFE_PATH, UnsafePath, is_disk_full, recover_dir
from uff_port.protocol import finished_fields
from uff_port.protocol.errors import ErrorCode
from uff_port.training import dist, export, zero
from uff_port.training.builtin import resolve_data_path
from uff_port.training.channel import Command, Inbox
from uff_port.training.continuity import ContinuityGuard, LossWindow
from uff_port.training.control import CKPT, DISK_FULL, GO, STOP, STOP_NOSAVE, Control, StopTraining
from uff_port.training.data import PackedStream, Sequence_, collate
from uff_port.training.engines import StepEngine, flattens, make_engine, token_loss_sum
from uff_port.training.errors import NonFiniteStep, TrainError
from uff_port.training.model import (
    load_model,
    load_tokenizer,
    pick_device,
    pick_precision,
    tokenizer_hash,
    trainable_parameters,
)
from uff_port.training.reporting import Reporter
from uff_port.training.state import (
    AsyncCheckpointer,
    TrainingSnapshot,
    capture_rng,
    read_snapshot,
    restore_rng,
    snapshot,
)

__all__ = ["StopTraining", "TrainError", "Trainer"]

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
        resume_hint: Path | None = None,
        writer_lock_fd: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.report = reporter
        self.inbox = inbox
        self.resume_from = resume_from  # explicit: exactly this checkpoint, or refuse
        self.fresh = fresh
        self.resume_hint = resume_hint  # the worker's pick, verified under the lock it hands us
        self.writer_lock_fd = writer_lock_fd
        self._lock_handed_over = False
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
        self.nonfinite_skipped = 0
        self.sinks: Any = None  # metrics.RunSinks on rank 0, once set up
        self.control = Control(inbox, reporter, self.emit)

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
        # Validation checked distributed.nproc; the world size actually started may differ
        # (torchrun or a cloud launcher started by hand).
        if t.grad_accum_steps % self.world:
            raise TrainError(
                ErrorCode.INVALID_CONFIG,
                f"training.grad_accum_steps: {t.grad_accum_steps} must be divisible by the number of "
                f"processes ({self.world}) so the global batch stays micro_batch_size * grad_accum_steps",
            )
        self.set_state("loading", world_size=self.world, pid=os.getpid())  # `status` tells a live load from a dead one
        self.device = pick_device(cfg)
        if self.device.type == "cpu" and t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        if t.deterministic:
            use_deterministic_kernels()
        self.precision = pick_precision(cfg, self.device)
        self._check_fits()
        self.micro = t.micro_batch_size
        self.accum = t.grad_accum_steps // self.world
        torch.manual_seed(t.seed)  # identical LoRA init on every rank
        self.tokenizer = load_tokenizer(cfg)
        self._code_eval_step = -1  # the step eval.suites last ran at
        self.tok_hash = tokenizer_hash(self.tokenizer)
        self._config_hash = config_hash(cfg)  # as written: before num_epochs becomes max_steps
        self._scan_data()  # a missing file or a corpus of bad lines is refused before the model loads
        self.model = load_model(cfg, self.device, self.precision)
        self.params = trainable_parameters(self.model)
        if not self.params:  # validation refuses lora off with nf4; this is what the model says
            raise TrainError(ErrorCode.INVALID_CONFIG, "lora.enabled: false leaves no trainable parameters; enable LoRA")
        self.engine: StepEngine = make_engine(
            cfg, self.model, self.params, self.device, self.precision, self.world, micro=self.micro, accum=self.accum
        )
        self.data = self._stream("train")
        self.store = CheckpointStore(self.run_dir, keep_last=cfg.checkpoint.keep_last, emit=self.emit)
        if self.rank == 0:
            self._become_writer()
            recover_dir(self.run_dir / layout.FINAL)  # an export that died mid-swap
        self.checkpointer = AsyncCheckpointer(self.store, emit=self._on_checkpoint_event)
        self.meta = {
            "config_hash": self._config_hash,
            "resume_hash": resume_hash(cfg),
            "resume_view": resume_view(cfg),
            "tokenizer_hash": self.tok_hash,
            "versions": _versions(),
            "world_size": self.world,
            "optimizer_layout": self.engine.layout,
        }
        # Dropout differs per rank. Seeded before the resume: a restored checkpoint's RNG
        # state must be the last word, or resumed runs drift from uninterrupted ones.
        torch.manual_seed(t.seed + 1000003 * self.rank)
        self._maybe_resume()
        self._attach_sinks()
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

    def _scan_data(self) -> None:
        """Scan the corpus with the tokenizer: refuse a bad-line share over data.max_bad_line_fraction
        (chat records with no chat template, say), and turn training.num_epochs into max_steps."""
        from uff_port.training.data import SCAN_LINES, scan_corpus

        t = self.cfg.training
        scan = scan_corpus(self.cfg.data.path, self.tokenizer, self.cfg.data,
                           max_lines=None if t.num_epochs is not None else SCAN_LINES)
        refusal = scan.refusal(self.cfg.data)
        if refusal is not None:
            raise refusal
        if t.num_epochs is not None:
            per_epoch = scan.steps_per_epoch(t.micro_batch_size, t.grad_accum_steps)
            t.max_steps = max(1, math.ceil(t.num_epochs * per_epoch))
            self.emit("log", level="info", code="epochs", steps_per_epoch=per_epoch, max_steps=t.max_steps,
                      message=f"training.num_epochs {t.num_epochs:g}: {scan.train_sequences} rows of "
                              f"{self.cfg.data.seq_len} tokens per epoch, {per_epoch} steps per epoch, "
                              f"{t.max_steps} steps in all")

    def _attach_sinks(self) -> None:
        """metrics.csv, TensorBoard and training.png, for every run whatever started it (rank 0)."""
        if self.rank != 0:
            return
        from uff_port.training.metrics import RunSinks

        self.sinks = RunSinks(self.run_dir, self.cfg.output, resumed_step=self.resumed_step,
                              warn=lambda message: self.emit("log", level="warning", message=message))
        self.report.listeners.append(self.sinks)

    def _become_writer(self) -> None:
        """Hold the run's writer lock for our whole life, before choosing where to resume.

        A predecessor orphaned by a dead worker may still be writing its final
        checkpoint: waiting for it (up to `checkpoint.grace_seconds`) means we
        resume from that checkpoint instead of an older one. Two live trainers
        on one run directory would overwrite each other: the second is refused.
        """
        if self.writer_lock_fd is not None and self.store.adopt_writer(self.writer_lock_fd):
            # The worker held the lock from its checkpoint scan until now: its pick still stands.
            self._lock_handed_over = True
            return
        grace = self.cfg.checkpoint.grace_seconds
        if not self.store.acquire_writer(timeout=grace):
            raise TrainError(
                ErrorCode.BUSY,
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
            raise TrainError(report.code, report.message)
        if self.rank == 0:
            from uff_port.planner.disk import check_disk

            disk = check_disk(self.cfg, self.run_dir)
            if not disk.fits:
                raise TrainError(ErrorCode.DISK_FULL, disk.message, resumable=True)

    def _stream(self, split: str) -> PackedStream:
        def bad(name: str, line_no: int, reason: str) -> None:
            self.emit("log", level="warning", code="bad_line", file=name, line=line_no, message=f"{name}:{line_no}: {reason}")

        shared = self.cfg.eval.path if split == "eval" else None  # eval.path: every line is held out
        if shared and not resolve_data_path(shared).is_file():
            raise TrainError(ErrorCode.DATA_NOT_FOUND, f"eval.path: no such file {shared!r}")
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

    def _load_checkpoint(self, path: Path) -> TrainingSnapshot:
        """Read a verified checkpoint and check it fits this model, touching nothing.

        Any failure other than a layout of other distributed settings means the
        checkpoint is unusable (CheckpointUnloadable): the store quarantines it
        and offers the next one.
        """
        try:
            snap = read_snapshot(path, rank=self.rank, seed=self.cfg.training.seed)
        except MemoryError:
            raise
        except Exception as exc:  # unpickling refused, a missing shard, bad JSON: all "does not load"
            raise CheckpointUnloadable(f"{type(exc).__name__}: {exc}") from exc
        if snap.layout != self.engine.layout:
            raise TrainError(
                ErrorCode.CHECKPOINT_MISMATCH,
                f"{path}: optimizer state saved as {snap.layout}, this run needs {self.engine.layout} "
                "(DeepSpeed shards resume only with the same ZeRO stage and number of processes); "
                "start fresh or use the original distributed settings",
            )
        try:
            self.engine.check(snap)
        except ValueError as exc:
            raise CheckpointUnloadable(str(exc)) from exc
        return snap

    def _maybe_resume(self) -> None:
        point: Path | None = self.resume_from
        snap: TrainingSnapshot | None = None
        if point is not None:
            try:
                snap = self._load_checkpoint(point)
            except CheckpointUnloadable as exc:
                raise TrainError(ErrorCode.CORRUPT_CHECKPOINT, f"{point}: does not load: {exc}") from None
        elif not self.fresh:
            found: ResumePoint | None = None
            if self.rank == 0:
                expect = {k: self.meta[k] for k in ("resume_hash", "resume_view", "tokenizer_hash")}
                # Under the writer lock: verified, loaded, or quarantined and the next one tried.
                found = self.store.find_resume_point(  # raises CheckpointMismatch
                    expect,
                    load=self._load_checkpoint,
                    trusted=self.resume_hint if self._lock_handed_over else None,
                )
            path = dist.broadcast_object(str(found.path) if found else None)
            point = Path(path) if path else None
            snap = found.state if found else None
        if point is None:
            return
        if snap is None:  # ranks other than 0 read their own RNG file
            snap = read_snapshot(point, rank=self.rank, seed=self.cfg.training.seed)
        self.engine.restore(point, snap)
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

    def _checkpoint_cursor(self) -> dict[str, Any]:
        """The data cursor a checkpoint holds; the SFT stream's is the same on every rank."""
        return self.data.state_dict()

    def save_checkpoint(self, *, wait: bool) -> str | None:
        """Snapshot at a step boundary (collective), write in the background on rank 0.

        Under DeepSpeed every rank first writes its optimizer shard into the
        staging directory rank 0 opened; the commit then covers all of them.
        """
        staging: Path | None = None
        if self.engine.writes_shards:
            if self.rank == 0:
                self.checkpointer.wait()  # one save at a time, and the sweep done before we stage
                staging = self.store.begin(self.step)
            staging = Path(dist.broadcast_object(str(staging) if staging else None))
            self.engine.save_shards(staging)
        with zero.gathered(self.params, self.engine.zero_stage):
            snap = snapshot(
                model=self.model,
                **self.engine.snapshot_parts(),
                data_cursor=self._checkpoint_cursor(),
                counters=self._counters(),
                step=self.step,
                rank=self.rank,
                world_size=self.world,
            )
        snap.layout, snap.staging = self.engine.layout, staging
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
            if isinstance(err, UnsafePath):  # checkpoints/ now leads out of the run
                raise TrainError(UNSAFE_PATH, str(err), resumable=True)
            if err is not None and self._is_disk_full(err):
                raise TrainError(ErrorCode.DISK_FULL, self._disk_full_message(), resumable=True)
            why = f": {type(err).__name__}: {err}" if err is not None else ""
            raise TrainError(ErrorCode.CHECKPOINT_FAILED, f"checkpoint of step {self.step} did not become durable{why}",
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
    def _checkpoint_ref(self) -> dict[str, Any] | None:
        """`last_checkpoint` as every event and reply carries it: `{step, path}` or None."""
        if self.last_checkpoint is None:
            return None
        return {"step": self._ckpt_step, "path": self.last_checkpoint}

    def _status(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "max_steps": self.cfg.training.max_steps,
            "loss": self.loss,
            "last_checkpoint": self._checkpoint_ref(),
            "state": self.state,
        }

    def _poll(self, pending: list[Command]) -> int:
        """Answer status at once; return the strongest control word asked for."""
        return self.control.poll(pending, self._status)

    def _act(self, want: int, pending: list[Command]) -> None:
        """Carry out an agreed control word at a step boundary."""
        if want == GO:
            return
        path: str | None = None
        if want in (CKPT, STOP):
            self.set_state("checkpointing")
            path = self._checkpoint_of_this_step()
        self.control.answer(pending, self.step, path)
        if want in (STOP, STOP_NOSAVE):
            self.set_state("stopped", checkpoint=path)
            raise StopTraining(ExitCode.RESUMABLE)
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
            self._boundary(pending)
            t0 = time.monotonic()
            self._step_cursor = self.data.state_dict()
            seqs = self.data.take(self.micro * self.accum)
            if not seqs:
                raise TrainError(ErrorCode.NO_DATA, "data.path: the training stream ended unexpectedly")
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
                lr=self.engine.lr(),
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

    def _boundary(self, pending: list[Command]) -> None:
        """Between two steps: answer the control words, checkpoint when due, stop near the deadline."""
        want = self._poll(pending)
        if self._should_checkpoint():
            want = max(want, CKPT)
        if self._near_deadline():
            self.emit("log", level="warning", message="training.max_runtime nearly spent: checkpointing")
            want = max(want, STOP)
        # Clocks and signals are per rank: all ranks do what the most urgent one asks.
        if self._checkpoint_hit_full_disk():
            want = DISK_FULL
        want = dist.agree_max(want, self.device)
        if want == DISK_FULL:
            # Training on would only pile up steps that no checkpoint can keep. The last
            # durable checkpoint is intact (commits are atomic): resumable once space is freed.
            raise TrainError(ErrorCode.DISK_FULL, self._disk_full_message(), resumable=True)
        if want == CKPT and not pending:  # periodic: do not block the loop
            self.save_checkpoint(wait=False)
        else:
            self._act(want, pending)

    def _skip_or_fail(self, bad: NonFiniteStep) -> None:
        """Drop a non-finite batch while `training.skip_nonfinite_steps` allows, else fail.

        The weights never saw the bad gradient (the check runs before the optimizer
        step), so the last checkpoint stays good. The failure is final: an exact
        resume would meet the same batch again; raising the budget is the way past it.
        """
        if bad.stepped:  # the engine has stepped already: no skipping, the run stops (nothing is saved)
            raise TrainError(ErrorCode.NON_FINITE, f"non-finite loss at step {self.step + 1} under DeepSpeed; the last "
                             f"checkpoint ({self.last_checkpoint}) is the last good state", final=True)
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
            ErrorCode.NON_FINITE,
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
                self.engine.zero_grad()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.micro <= 1 or self.world > 1 or not self.engine.can_back_off:
                    raise TrainError(
                        ErrorCode.OUT_OF_MEMORY,
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
        self.engine.module.train()
        local_tokens = sum(s.n_targets for s in seqs)
        total = dist.all_reduce_sum(torch.tensor(float(local_tokens), device=self.device))
        denom = max(float(total), 1.0)
        chunks = [seqs[i : i + self.micro] for i in range(0, len(seqs), self.micro)]

        def between(_i: int) -> None:
            if self.world != 1:  # ranks poll only at step boundaries, where they agree
                return
            want = self._poll(pending)
            if want in (STOP, STOP_NOSAVE):
                # Abandon the half-done step: the checkpoint is the last boundary,
                # with the RNG as it was there, so resume replays this step exactly.
                self.engine.zero_grad()
                restore_rng(rng)
                self.data.load_state_dict(self._step_cursor)
                self._act(want, pending)

        return self.engine.step(chunks, denom, total, pad_id=self.data.pad_id, step_no=self.step + 1, between=between)

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
            batch = {k: v.to(self.device) for k, v in collate(seqs, stream.pad_id, flatten=flattens(self.cfg)).items()}
            count += sum(s.n_targets for s in seqs)
            mode = getattr(self.engine, "loss_mode", self.cfg.training.loss)  # ZeRO-3: full
            loss_sum += token_loss_sum(model, batch, self.engine.autocast, mode).float()
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
        if self.engine.zero_stage == 3:  # sharded parameters: generation would need them gathered
            self.emit("log", level="warning", message="eval.suites skipped: not supported with zero_stage 3")
            return
        self._code_eval_step = self.step
        self.set_state("evaluating")
        want = run_suites(self.cfg.eval.suites, self.run_dir, self.model, self.tokenizer, self.device,
                          self.step, self.cfg.eval.every_steps, final, self.emit,
                          lambda: self._poll(pending), STOP_NOSAVE, self.eval_loss)
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
            with zero.gathered(self.params, self.engine.zero_stage):  # every rank, under ZeRO-3
                final = self.save_final() if self.rank == 0 else None
        if self.rank == 0:
            peak, where = _peak_memory(self.device)
            self.emit("log", level="info", message=f"peak memory {peak / 2**20:,.0f} MiB ({where})",
                      peak_memory_bytes=peak, peak_memory_of=where)
        if self.sinks is not None:
            self.sinks.settle()  # metrics.csv and training.png complete before anyone hears `finished`
        self.emit(
            "finished",
            **finished_fields(
                step=self.step,
                max_steps=self.cfg.training.max_steps,
                loss=self.loss,
                eval_loss=self.eval_loss,
                final=str(final) if final else None,
                last_checkpoint=self._checkpoint_ref(),
                tokens_seen=self.tokens_seen,
            ),
        )
        self.state = "finished"
        return ExitCode.OK

    def save_final(self) -> Path:
        """Adapter (and optional merged model) to RUN_DIR/final, committed by one rename."""
        return export.save_final(self.run_dir, self.model, self.tokenizer, self.cfg, step=self.step, meta=self.meta,
                                 emit=self.emit)

    def settle(self) -> None:
        """Let a checkpoint in flight become durable (before a `failed` says what is resumable)."""
        if self.rank == 0 and hasattr(self, "checkpointer"):
            self.checkpointer.wait(self.cfg.checkpoint.grace_seconds)

    def cleanup(self) -> None:
        self.settle()
        if self.sinks is not None:
            self.report.listeners.remove(self.sinks)
            self.sinks.close()
        if hasattr(self, "data"):
            self.data.close()


def use_deterministic_kernels() -> None:
    """Bit-identical CUDA runs: cuBLAS's fixed workspace, deterministic algorithms only.

    Not warn_only: then SDPA's memory-efficient backward keeps its non-deterministic
    kernel (two bf16 1.3B runs differed by 2e-4 at step 2 that way). An op with no
    deterministic kernel fails the run instead, naming the op.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")  # flash-attn 2's backward
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """The most this process held: allocated CUDA memory on a GPU, else resident RAM."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "GPU"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "RAM"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "uff_port": __version__}
