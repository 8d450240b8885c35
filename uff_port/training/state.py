"""Everything needed to continue training exactly: capture, write, read, apply.

The loop is blocked only by `snapshot`, which copies trainable weights,
optimizer/scheduler/scaler state and the RNG states into fresh CPU objects.
Those copies belong to the snapshot alone, so `AsyncCheckpointer` can write
them in a background thread while the loop goes on mutating the originals.

Files of a checkpoint (all `.pt` files load with `torch.load(weights_only=True)`):

    adapter_model.safetensors  trainable weights (peft adapter keys: loadable by peft)
    adapter_config.json        the peft config, when the model is a peft model
    optimizer.pt scheduler.pt  state dicts (torch layout)
    deepspeed/                 per-rank ZeRO shards instead (DeepSpeed layout, see zero.py)
    scaler.pt                  grad scaler state (fp16 only)
    rng-rank{r}.pt             python/numpy/torch/CUDA RNG of rank r
    trainer_state.json         step, data cursor, counters, world size
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from uff_port.core.checkpoint_store import CheckpointStore, ResumePoint

STATE_FORMAT: Final = 1
ADAPTER_FILE: Final = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE: Final = "adapter_config.json"
TRAINER_STATE_FILE: Final = "trainer_state.json"

Emit = Callable[..., None]


# -- RNG ------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """RNG state of python, numpy, torch CPU and every CUDA device, in weights_only-safe types."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng; `{"derived_seed": s}` seeds every generator with s instead."""
    if "derived_seed" in state:
        seed = int(state["derived_seed"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every CUDA device
        return
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # A machine with fewer devices restores the ones it has; extra ones keep their seed.
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def derived_seed(step: int, rank: int, seed: int = 0) -> int:
    """A deterministic seed for a rank that has no saved RNG (the world size grew)."""
    digest = hashlib.sha256(f"uff-port-rng:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# -- snapshot -------------------------------------------------------------------


@dataclass
class TrainingSnapshot:
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    """None when DeepSpeed writes the optimizer state itself (its shards are in `staging`)."""
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    data_cursor: dict[str, Any]
    counters: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    rank_rngs: dict[int, dict[str, Any]] = field(default_factory=dict)
    """RNG of every rank (gathered to the writer); `{rank: rng}` when single-process."""
    adapter_config: dict[str, Any] | None = None
    capture_seconds: float = 0.0
    """How long `snapshot` blocked the loop."""
    layout: str = "torch"
    """How the optimizer state is stored: "torch" or "deepspeed-zeroS-worldN"."""
    staging: Path | None = None
    """A staging directory already holding files (DeepSpeed shards) to commit with the snapshot."""


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor copied to CPU: the loop may mutate the originals next step."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _unwrap(model: Any) -> Any:
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
        type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")
    ):
        model = model.module
    return model


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_adapter")


def _trainable_state(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    model = _unwrap(model)
    if _is_peft(model):
        from peft import get_peft_model_state_dict

        name = model.active_adapter
        cfg = model.peft_config[name].to_dict()
        config = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}, config
    return {
        n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad
    }, None


def snapshot(
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    data_cursor: dict[str, Any],
    counters: dict[str, Any],
    step: int,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingSnapshot:
    """Copy the state off the device (the only part that blocks the loop).

    With torch.distributed initialised and world_size > 1 this is a collective:
    every rank calls it at the same step and the RNG of every rank is gathered,
    so the writer (rank 0) saves them all.
    """
    t0 = time.perf_counter()
    adapter, adapter_config = _trainable_state(model)
    rng = capture_rng()
    rank_rngs = {rank: rng}
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, rng)
        rank_rngs = dict(enumerate(gathered))
    snap = TrainingSnapshot(
        step=step,
        adapter=adapter,
        optimizer=_to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        scheduler=_to_cpu(scheduler.state_dict()) if scheduler is not None else {},
        scaler=_to_cpu(scaler.state_dict()) if scaler is not None else None,
        rng=rng,
        data_cursor=json.loads(json.dumps(data_cursor)),
        counters=json.loads(json.dumps(counters)),
        rank=rank,
        world_size=world_size,
        rank_rngs=rank_rngs,
        adapter_config=adapter_config,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    snap.capture_seconds = time.perf_counter() - t0
    return snap


def write_snapshot(snap: TrainingSnapshot, staging_dir: str | Path) -> None:
    """Write the snapshot's files into a staging directory (the store fsyncs and commits)."""
    out = Path(staging_dir)
    save_file(snap.adapter, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    if snap.adapter_config is not None:
        (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(snap.adapter_config, indent=2, sort_keys=True))
    if snap.optimizer is not None:
        torch.save(snap.optimizer, out / "optimizer.pt")
        torch.save(snap.scheduler, out / "scheduler.pt")
    if snap.scaler is not None:
        torch.save(snap.scaler, out / "scaler.pt")
    for r, rng in sorted((snap.rank_rngs or {snap.rank: snap.rng}).items()):
        torch.save(rng, out / f"rng-rank{r}.pt")
    state = {
        "format": STATE_FORMAT,
        "step": snap.step,
        "world_size": snap.world_size,
        "ranks_with_rng": sorted(snap.rank_rngs) if snap.rank_rngs else [snap.rank],
        "adapter_kind": "peft" if snap.adapter_config is not None else "trainable_params",
        "optimizer_layout": snap.layout,
        "data_cursor": snap.data_cursor,
        "counters": snap.counters,
    }
    (out / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def _load(path: Path) -> Any:
    # weights_only: a checkpoint may come from a cloud pull; never unpickle code.
    return torch.load(path, map_location="cpu", weights_only=True)


def read_snapshot(path: str | Path, rank: int = 0, seed: int = 0) -> TrainingSnapshot:
    """Load a (verified) checkpoint directory for `rank`.

    A rank with no RNG file of its own (the run grew from 1 to 2 processes)
    gets a seed derived from step, rank and `seed`, so the result is still
    deterministic.
    """
    src = Path(path)
    state = json.loads((src / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{src / TRAINER_STATE_FILE}: unknown format {state.get('format')!r}")
    step = int(state["step"])
    rng_file = src / f"rng-rank{rank}.pt"
    rng = _load(rng_file) if rng_file.exists() else {"derived_seed": derived_seed(step, rank, seed)}
    config_file = src / ADAPTER_CONFIG_FILE
    scaler_file = src / "scaler.pt"
    optimizer_file, scheduler_file = src / "optimizer.pt", src / "scheduler.pt"
    return TrainingSnapshot(
        step=step,
        adapter=load_file(str(src / ADAPTER_FILE)),
        optimizer=_load(optimizer_file) if optimizer_file.exists() else None,
        scheduler=_load(scheduler_file) if scheduler_file.exists() else {},
        scaler=_load(scaler_file) if scaler_file.exists() else None,
        rng=rng,
        data_cursor=state["data_cursor"],
        counters=state["counters"],
        rank=rank,
        world_size=int(state["world_size"]),
        rank_rngs={rank: rng},
        adapter_config=json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else None,
        layout=str(state.get("optimizer_layout", "torch")),
    )


def check_snapshot(snap: TrainingSnapshot, *, model: Any, optimizer: Any) -> None:
    """Raise ValueError if `snap` cannot be applied to this model and optimizer; changes nothing.

    Run before `apply_snapshot`, so a checkpoint that would fail half-way
    (a wrong shape, a state for other parameters) is refused while the model
    is still untouched and the previous checkpoint can be used instead.
    """
    inner = _unwrap(model)
    if _is_peft(inner):
        from peft import get_peft_model_state_dict

        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(inner).items()}
    else:
        expected = {n: tuple(p.shape) for n, p in inner.named_parameters() if p.requires_grad}
    got = {k: tuple(v.shape) for k, v in snap.adapter.items()}
    if set(got) != set(expected):
        extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
        raise ValueError(f"adapter: weights the model lacks {extra[:3]}, weights missing {missing[:3]}")
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in sorted(got) if got[k] != expected[k]]
    if wrong:
        raise ValueError(f"adapter: wrong shapes: {wrong[:3]}")
    if optimizer is None:
        return
    if snap.optimizer is None:
        raise ValueError("optimizer: no optimizer.pt in this torch-layout checkpoint")
    state, groups = snap.optimizer.get("state"), snap.optimizer.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError("optimizer: the saved state does not have this optimizer's parameter groups")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in groups for i in (g.get("params") or [])]
    if len(saved_ids) != len(params):
        raise ValueError(f"optimizer: state for {len(saved_ids)} parameters, the model trains {len(params)}")
    for index, param in zip(saved_ids, params, strict=True):
        for key, value in (state.get(index) or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"optimizer: {key} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(param.shape)}")


def apply_snapshot(snap: TrainingSnapshot, *, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> None:
    """Restore weights, optimizer, scheduler, scaler and RNG (cursor and counters are the caller's)."""
    inner = _unwrap(model)
    if _is_peft(inner):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(inner, snap.adapter, adapter_name=inner.active_adapter)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter: checkpoint holds weights the model lacks: {unexpected[:5]}")
    else:
        params = dict(inner.named_parameters())
        missing = [k for k in snap.adapter if k not in params]
        if missing:
            raise ValueError(f"adapter: checkpoint holds weights the model lacks: {missing[:5]}")
        with torch.no_grad():
            for name, tensor in snap.adapter.items():
                params[name].copy_(tensor)
    if snap.optimizer is None:
        raise ValueError("optimizer: this checkpoint holds DeepSpeed shards, not a torch optimizer state")
    optimizer.load_state_dict(snap.optimizer)
    if scheduler is not None and snap.scheduler:
        scheduler.load_state_dict(snap.scheduler)
    if scaler is not None and snap.scaler:
        scaler.load_state_dict(snap.scaler)
    # RNG last: nothing above may draw from it after the restore.
    restore_rng(snap.rng)


def snapshot_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- background writer -----------------------------------------------------------


class AsyncCheckpointer:
    """Writes and commits snapshots in a background thread, one at a time."""

    def __init__(self, store: CheckpointStore, emit: Emit | None = None) -> None:
        self.store = store
        self._emit = emit
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.last: ResumePoint | None = None
        self.last_error: BaseException | None = None
        self.saves = 0
        self._swept = False

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, snap: TrainingSnapshot, meta: dict[str, Any]) -> None:
        """Start writing `snap`; first waits for a save still in flight (never two overlap)."""
        t0 = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - t0
        with self._lock:
            self.last_error = None
            # non-daemon: an interpreter that is exiting still finishes the write.
            self._thread = threading.Thread(
                target=self._run, args=(snap, dict(meta), waited), name=f"checkpoint-{snap.step}"
            )
            self._thread.start()

    def wait(self, timeout: float | None = None) -> ResumePoint | None:
        """Block until the save in flight is durable; its point, or None if it failed or timed out."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return None
        return None if self.last_error is not None else self.last

    def _run(self, snap: TrainingSnapshot, meta: dict[str, Any], waited: float) -> None:
        t0 = time.perf_counter()
        staging: Path | None = None
        try:
            if not self._swept:
                self._swept = True
                if self.store.acquire_writer(timeout=0.0):
                    # The run's only writer now: what a killed predecessor left
                    # half-written can go, off the loop's critical path.
                    self.store.cleanup_staging()
                elif self._emit is not None:
                    self._emit(
                        "log",
                        level="warning",
                        code="concurrent_writer",
                        message=f"another process (pid {self.store.writer_pid()}) writes checkpoints to "
                        f"{self.store.run_dir}; leaving its unfinished writes alone",
                    )
            staging = snap.staging or self.store.begin(snap.step)
            write_snapshot(snap, staging)
            size = snapshot_bytes(staging)
            meta.setdefault("world_size", snap.world_size)
            path = self.store.commit(staging, snap.step, meta)
        except BaseException as exc:  # noqa: BLE001 - reported as an event, never lost in a thread
            if staging is not None:
                self.store.abort(staging)
            self.last_error = exc
            if self._emit is not None:
                self._emit(
                    "log",
                    level="error",
                    message=f"checkpoint of step {snap.step} failed: {type(exc).__name__}: {exc}",
                    step=snap.step,
                )
            return
        self.last = ResumePoint(snap.step, path, json.loads((path / "manifest.json").read_text()))
        self.saves += 1
        if self._emit is not None:
            self._emit(
                "checkpoint",
                step=snap.step,
                path=str(path),
                seconds=round(time.perf_counter() - t0, 4),
                bytes=size,
                blocked_seconds=round(snap.capture_seconds + waited, 4),
            )
