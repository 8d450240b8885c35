"""RNG capture/restore, snapshot round trip on a real tiny peft model, background saves."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.core.checkpoint_store import CheckpointStore
from uff_port.hashing import sha256_file
from uff_port.training.state import (
    AsyncCheckpointer,
    apply_snapshot,
    capture_rng,
    read_snapshot,
    restore_rng,
    snapshot,
    write_snapshot,
)

VOCAB = 61


def draw() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.standard_normal()), torch.rand(3).tolist()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), burn=st.integers(0, 50))
def test_rng_round_trip(seed: int, burn: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for _ in range(burn):
        draw()
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    state = capture_rng()
    expected = [draw() for _ in range(3)]
    for _ in range(7):
        draw()
    restore_rng(state)
    assert [draw() for _ in range(3)] == expected


def test_rng_state_survives_weights_only_load(tmp_path: Path) -> None:
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = draw()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


# -- a tiny real model ---------------------------------------------------------------------


def build(seed: int, scaler: bool = False) -> tuple[Any, Any, Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # same base weights every time, as when loading a pretrained model
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    base = LlamaForCausalLM(cfg)
    torch.manual_seed(seed)  # LoRA init differs per seed: apply_snapshot must override it
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    return model, opt, sched, grad_scaler


def train_steps(model: Any, opt: Any, sched: Any, scaler: Any, n: int) -> list[float]:
    """Batches come from the torch RNG and dropout uses it too: both must be restored."""
    losses = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("use_scaler", [False, True], ids=["fp32", "scaler"])
def test_snapshot_round_trip_continues_bit_for_bit(tmp_path: Path, use_scaler: bool) -> None:
    torch.manual_seed(7)
    reference = train_steps(*build(1, use_scaler), 8)

    torch.manual_seed(7)
    model, opt, sched, scaler = build(1, use_scaler)
    first = train_steps(model, opt, sched, scaler, 3)
    events: list[tuple[str, dict[str, Any]]] = []
    store = CheckpointStore(tmp_path, emit=lambda e, **f: events.append((e, f)))
    writer = AsyncCheckpointer(store, emit=lambda e, **f: events.append((e, f)))
    snap = snapshot(
        model=model, optimizer=opt, scheduler=sched, scaler=scaler,
        data_cursor={"byte_offset": 1234, "file_index": 0}, counters={"tokens": 72}, step=3,
    )
    writer.save(snap, {"config_hash": "h"})
    train_steps(model, opt, sched, scaler, 2)  # the loop goes on while the save is written
    point = writer.wait()
    assert point is not None and point.step == 3
    (checkpoint,) = [f for e, f in events if e == "checkpoint"]
    assert checkpoint["step"] == 3 and checkpoint["bytes"] > 0 and checkpoint["blocked_seconds"] >= 0

    # A new process: other LoRA init, other RNG; everything comes from the checkpoint.
    torch.manual_seed(999)
    random.seed(999)
    model2, opt2, sched2, scaler2 = build(2, use_scaler)
    found = CheckpointStore(tmp_path).find_resume_point()
    assert found is not None
    loaded = read_snapshot(found.path)
    assert loaded.data_cursor == {"byte_offset": 1234, "file_index": 0} and loaded.counters == {"tokens": 72}
    assert (loaded.scaler is not None) == use_scaler
    apply_snapshot(loaded, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert first + train_steps(model2, opt2, sched2, scaler2, 5) == reference


def test_checkpoint_adapter_loads_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    model, opt, sched, scaler = build(3)
    train_steps(model, opt, sched, scaler, 2)
    snap = snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor={}, counters={}, step=2)
    write_snapshot(snap, tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        torch.load(tmp_path / name, weights_only=True)
    model.eval()
    torch.manual_seed(0)
    cfg = model.get_base_model().config
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(LlamaConfig(**cfg.to_dict())), tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_snapshot_is_independent_of_later_training(tmp_path: Path) -> None:
    model, opt, sched, scaler = build(4)
    train_steps(model, opt, sched, scaler, 1)
    snap = snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor={}, counters={}, step=1)
    before = {k: v.clone() for k, v in snap.adapter.items()}
    exp_avg = next(iter(snap.optimizer["state"].values()))["exp_avg"].clone()
    train_steps(model, opt, sched, scaler, 2)
    assert all(torch.equal(before[k], snap.adapter[k]) for k in before)
    assert torch.equal(exp_avg, next(iter(snap.optimizer["state"].values()))["exp_avg"])


def test_rank_without_rng_file_gets_a_deterministic_seed(tmp_path: Path) -> None:
    model, opt, sched, scaler = build(5)
    snap = snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor={}, counters={}, step=40)
    write_snapshot(snap, tmp_path)
    a, b = read_snapshot(tmp_path, rank=1), read_snapshot(tmp_path, rank=1)
    assert "derived_seed" in a.rng and a.rng == b.rng
    assert read_snapshot(tmp_path, rank=2).rng != a.rng
    restore_rng(a.rng)
    first = draw()
    restore_rng(b.rng)
    assert draw() == first


# -- background writer ----------------------------------------------------------------------


def test_saves_never_overlap(tmp_path: Path) -> None:
    active, peak = 0, 0
    lock = threading.Lock()

    def slow(name: str) -> None:
        nonlocal active, peak
        if name == "files_synced":
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.15)
            with lock:
                active -= 1

    events: list[tuple[str, dict[str, Any]]] = []
    store = CheckpointStore(tmp_path, keep_last=5, fault_hook=slow)
    writer = AsyncCheckpointer(store, emit=lambda e, **f: events.append((e, f)))
    model, opt, sched, scaler = build(6)
    for step in (1, 2, 3):
        snap = snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor={}, counters={}, step=step)
        t0 = time.perf_counter()
        writer.save(snap, {})
        if step == 1:
            assert time.perf_counter() - t0 < 0.1  # the first save does not block
    point = writer.wait()
    assert point is not None and point.step == 3
    assert peak == 1
    steps = [f["step"] for e, f in events if e == "checkpoint"]
    assert steps == [1, 2, 3]
    # the second and third saves had to wait for the one before: counted as blocked time
    assert [f for e, f in events if e == "checkpoint"][1]["blocked_seconds"] >= 0.05
    assert [p.step for p in store.list_committed()] == [1, 2, 3]


def test_failed_save_is_reported_and_cleaned(tmp_path: Path) -> None:
    def fail(name: str) -> None:
        if name == "manifest_written":
            raise OSError(28, "No space left on device")

    events: list[tuple[str, dict[str, Any]]] = []
    store = CheckpointStore(tmp_path, fault_hook=fail)
    writer = AsyncCheckpointer(store, emit=lambda e, **f: events.append((e, f)))
    model, opt, sched, scaler = build(7)
    writer.save(snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor={}, counters={}, step=1), {})
    assert writer.wait() is None
    assert isinstance(writer.last_error, OSError)
    (log,) = [f for e, f in events if e == "log"]
    assert log["level"] == "error" and "No space left" in log["message"]
    assert not any(events for e, _ in events if e == "checkpoint")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_trainer_state_json_is_readable(tmp_path: Path) -> None:
    model, opt, sched, scaler = build(8)
    cursor = {"file_index": 1, "byte_offset": 99, "pack_buffer": [1, 2, 3], "shuffle_state": None}
    snap = snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor=cursor, counters={"epoch": 0}, step=9)
    write_snapshot(snap, tmp_path)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["data_cursor"] == cursor and state["adapter_kind"] == "peft"
    assert sha256_file(tmp_path / "adapter_model.safetensors")


_DDP_CHILD = r"""
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.path.dirname(sys.argv[3]))
from test_checkpoint_state import build, train_steps
from uff_port.core.checkpoint_store import CheckpointStore
from uff_port.training.state import AsyncCheckpointer, snapshot
rank, run = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.manual_seed(100 + rank)  # every rank has its own RNG stream (dropout differs per rank)
model, opt, sched, scaler = build(1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
train_steps(ddp, opt, sched, scaler, 2)
snap = snapshot(model=ddp, optimizer=opt, scheduler=sched, scaler=scaler,
                data_cursor={"seq_index": 8}, counters={}, step=2, rank=rank, world_size=2)
if rank == 0:
    writer = AsyncCheckpointer(CheckpointStore(run))
    writer.save(snap, {})
    assert writer.wait() is not None
torch.save(torch.rand(4), os.path.join(run, f"next-draw-rank{rank}.pt"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_save_every_rank_rng_and_one_rank_resumes(tmp_path: Path) -> None:
    """gloo DDP with 2 processes: the RNG of both ranks is gathered into the checkpoint."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _DDP_CHILD, str(r), str(tmp_path), __file__], env=env)
        for r in (0, 1)
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    point = CheckpointStore(tmp_path).find_resume_point()
    assert point is not None and point.manifest["world_size"] == 2
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(point.manifest["files"])
    for rank in (0, 1):  # each rank's RNG continues exactly where that rank stopped
        restore_rng(read_snapshot(point.path, rank=rank).rng)
        assert torch.equal(torch.rand(4), torch.load(tmp_path / f"next-draw-rank{rank}.pt", weights_only=True))
    # the same checkpoint resumed by one process: rank 0's state, same global cursor
    one = read_snapshot(point.path, rank=0)
    assert one.data_cursor == {"seq_index": 8} and one.world_size == 2


def test_writer_leaves_a_live_predecessors_staging_alone(tmp_path: Path) -> None:
    predecessor = CheckpointStore(tmp_path)
    assert predecessor.acquire_writer()
    theirs = predecessor.begin(30)  # its save in flight
    events: list[tuple[str, dict[str, Any]]] = []
    model, opt, sched, scaler = build(9)
    snap = snapshot(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_cursor={}, counters={}, step=2)
    writer = AsyncCheckpointer(CheckpointStore(tmp_path), emit=lambda e, **f: events.append((e, f)))
    writer.save(snap, {})
    assert writer.wait() is not None and theirs.is_dir()
    assert [f["code"] for e, f in events if e == "log"] == ["concurrent_writer"]
    predecessor.release_writer()  # it exited: the next writer sweeps what it left
    late = AsyncCheckpointer(CheckpointStore(tmp_path))
    late.save(snap, {})
    assert late.wait() is not None and not theirs.exists()


def test_a_torn_event_line_from_a_killed_run_does_not_swallow_the_next_runs_first_event(tmp_path: Path) -> None:
    from uff_port.training.reporting import Reporter, read_events

    (tmp_path / "events.jsonl").write_text('{"event":"progress","step":1}\n{"event":"progress","st')
    Reporter(tmp_path).emit("state", state="starting")
    assert [e["event"] for e in read_events(tmp_path)] == ["progress", "state"]
    Reporter(tmp_path).emit("state", state="loading")  # a whole last line is left alone
    assert (tmp_path / "events.jsonl").read_text().count("\n\n") == 0
