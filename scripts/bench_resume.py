#!/usr/bin/env python
"""Resume benchmarks, each a ratio against a baseline measured in the same invocation.

    data        seek-to-offset resume at 90% of an N-line JSONL (default 1,000,000) vs
                re-iterating the stream to the same position, the way iterable-dataset
                trainers skip (two baselines: our full tokenize+pack pipeline over a
                capped prefix, extrapolated per line, and a bare readline+json.loads pass
                over all 90%, the cheapest possible skip).
    blocked     time the training loop is blocked per checkpoint (snapshot + waiting for
                the previous save) as a share of the checkpoint interval, and the
                throughput cost of checkpointing vs the same run without checkpoints.
    recovery    kill-to-first-progress: SIGKILL a training process, start it again on
                the same run directory, time until it reports progress past the checkpoint.
    verify      choosing and loading a resume point (a LoRA checkpoint of a Llama): the one
                recovery path (the worker's locked scan with symlink checks, the trainer's
                re-check of the handed-over choice, load, shape check, apply) vs the previous
                path (a bare manifest re-hash, then load and apply), in interleaved rounds.

Usage: .venv/bin/python scripts/bench_resume.py [data|blocked|recovery|verify|all] [--lines N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # torture_resume: the trainer-process helpers

WORDS: Final = (
    "defmodule tank hull turret track armor engine GenServer handle_call state reply "
    "supervisor child spec init start_link def do end pipe map reduce with case"
).split()


def make_corpus(path: Path, lines: int, seed: int = 7) -> list[int]:
    """Write an N-line JSONL of varied length; return the byte offset of every 10% mark."""
    rng = random.Random(seed)
    marks = []
    offset = 0
    with open(path, "wb") as fh:
        for i in range(lines):
            if i % (lines // 10 or 1) == 0:
                marks.append(offset)
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40)))
            row = (json.dumps({"text": f"{i}: {text}"}) + "\n").encode()
            fh.write(row)
            offset += len(row)
    return marks


def _stream(path: Path, tokenizer: Any, cfg: Any) -> Any:
    from uff_port.training.data import PackedStream

    return PackedStream(str(path), tokenizer, cfg, seed=0)


def bench_data(lines: int, full_cap: int) -> dict[str, Any]:
    from uff_port.core.config import validate_config
    from uff_port.training.model import load_tokenizer

    cfg = validate_config({"data": {"eval_fraction": 0.0, "seq_len": 256}})
    tokenizer = load_tokenizer(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        marks = make_corpus(corpus, lines)
        gen_s = time.perf_counter() - t0
        target_line = lines * 9 // 10
        offset = marks[9]

        # The cursor a checkpoint at 90% would hold (a line boundary, empty pack buffer).
        probe = _stream(corpus, tokenizer, cfg.data)
        cursor = probe.state_dict()
        probe.close()
        cursor.update(byte_offset=offset, line_no=target_line)

        # ours: open, seek, produce the first sequence
        seek_runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            s = _stream(corpus, tokenizer, cfg.data)
            s.load_state_dict(cursor)
            first = s.next_sequence()
            seek_runs.append(time.perf_counter() - t0)
            s.close()
        assert first is not None
        seek_s = min(seek_runs)

        # baseline 1: our whole pipeline re-iterated from line 0 (capped, per-line rate)
        s = _stream(corpus, tokenizer, cfg.data)
        t0 = time.perf_counter()
        while s.line_no < (min(full_cap, target_line) if full_cap else target_line):
            if s.next_sequence() is None:
                break
        full_lines = s.line_no
        full_s = time.perf_counter() - t0
        s.close()
        full_est = full_s / max(full_lines, 1) * target_line

        # baseline 2: the cheapest skip there is, readline + json.loads over all 90%
        t0 = time.perf_counter()
        with open(corpus, "rb") as fh:
            for _ in range(target_line):
                json.loads(fh.readline())
            raw_offset = fh.tell()
        raw_s = time.perf_counter() - t0
        assert raw_offset == offset
    return {
        "lines": lines,
        "corpus_mb": round(offset / 0.9 / 2**20, 1),
        "generate_s": round(gen_s, 2),
        "seek_resume_s": round(seek_s, 5),
        "reiterate_pipeline_lines": full_lines,
        "reiterate_pipeline_s_measured": round(full_s, 2),
        "reiterate_pipeline_s_to_90pct": round(full_est, 2),
        "reiterate_raw_json_s_to_90pct": round(raw_s, 3),
        "ratio_vs_pipeline": round(full_est / seek_s, 1),
        "ratio_vs_raw_json": round(raw_s / seek_s, 1),
    }


def _bench_config(max_steps: int, every: int | None) -> dict[str, Any]:
    import torture_resume

    cfg = torture_resume.torture_config(max_steps, every or 1)
    cfg["checkpoint"]["every_steps"] = every
    cfg["data"]["seq_len"] = 128
    cfg["lora"]["r"] = 16
    return cfg


def _loop_seconds(events: list[dict[str, Any]]) -> tuple[float, int]:
    prog = [e for e in events if e.get("event") == "progress"]
    return prog[-1]["ts"] - prog[0]["ts"], prog[-1]["step"] - prog[0]["step"]


def bench_blocked(steps: int, every: int) -> dict[str, Any]:
    """The real trainer with and without periodic checkpoints, same invocation."""
    import torture_resume

    out: dict[str, Any] = {"trainer": {}, "large_adapter": _bench_large_adapter()}
    with tempfile.TemporaryDirectory(prefix="bench-blocked-") as tmp:
        runs = {}
        for label, ev in (("without", None), ("with", every), ("without_2", None), ("with_2", every)):
            run = Path(tmp) / label
            torture_resume.reference_run(run, _bench_config(steps, ev))
            runs[label] = torture_resume.read_events(run)
        loop = {k: _loop_seconds(v) for k, v in runs.items()}
        ckpts = [e for k in ("with", "with_2") for e in runs[k] if e.get("event") == "checkpoint"]
        periodic = [e for e in ckpts if e["step"] % every == 0 and e["step"] < steps]
        blocked = sorted(e["blocked_seconds"] for e in periodic)
        step_s = (loop["with"][0] + loop["with_2"][0]) / (loop["with"][1] + loop["with_2"][1])
        interval = every * step_s
        base_s = (loop["without"][0] + loop["without_2"][0]) / (loop["without"][1] + loop["without_2"][1])
        out["trainer"] = {
            "steps": steps,
            "every_steps": every,
            "checkpoints": len(periodic),
            "bytes_per_checkpoint": periodic[0]["bytes"] if periodic else None,
            "blocked_s_median": round(blocked[len(blocked) // 2], 5) if blocked else None,
            "blocked_s_max": round(blocked[-1], 5) if blocked else None,
            "write_s_median": round(sorted(e["seconds"] for e in periodic)[len(periodic) // 2], 4) if periodic else None,
            "interval_s": round(interval, 3),
            "blocked_share_of_interval": round(blocked[len(blocked) // 2] / interval, 5) if blocked else None,
            "step_s_with_checkpoints": round(step_s, 4),
            "step_s_without": round(base_s, 4),
            "throughput_ratio_with_vs_without": round(base_s / step_s, 3),
        }
    return out


def _bench_large_adapter() -> dict[str, Any]:
    """A bigger LoRA state (r=64 on all projections of an 8x1024 Llama): async vs synchronous save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from uff_port.core.checkpoint_store import CheckpointStore
    from uff_port.training.state import AsyncCheckpointer, snapshot, write_snapshot

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=64, lora_alpha=128, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:  # optimizer state as after a real step, without paying for one
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(model=model, optimizer=opt, scheduler=sched, scaler=None, data_cursor={}, counters={})
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        store = CheckpointStore(tmp, keep_last=2)
        sync, blocked, written = [], [], []
        events: list[dict[str, Any]] = []
        writer = AsyncCheckpointer(store, emit=lambda e, **f: events.append(f) if e == "checkpoint" else None)
        for i in range(3):
            t0 = time.perf_counter()
            snap = snapshot(**kw, step=2 * i + 1)
            staging = store.begin(2 * i + 1)
            write_snapshot(snap, staging)
            store.commit(staging, 2 * i + 1, {})
            sync.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            writer.save(snapshot(**kw, step=2 * i + 2), {})
            blocked.append(time.perf_counter() - t0)
            writer.wait()
            written.append(events[-1]["seconds"])
            size = events[-1]["bytes"]
    return {
        "trainable_params": sum(p.numel() for p in params),
        "checkpoint_mb": round(size / 2**20, 1),
        "sync_save_blocks_s": round(min(sync), 4),
        "async_save_blocks_s": round(min(blocked), 4),
        "background_write_s": round(min(written), 4),
        "blocked_ratio_async_vs_sync": round(min(blocked) / min(sync), 4),
        "note": "CPU tensors: on a GPU the blocking part is a device-to-host copy of the same bytes",
    }


def bench_recovery(kills: int) -> dict[str, Any]:
    """SIGKILL a trainer past a checkpoint, restart it: seconds to the first progress after the kill,
    against a cold start of a fresh run measured in the same invocation."""
    import signal

    import torture_resume

    cfg = _bench_config(400, 5)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        fresh, recover, lost = [], [], []
        for i in range(kills):
            cold = Path(tmp) / f"cold{i}"
            config = torture_resume.write_config(cold, cfg)
            t0 = time.monotonic()
            proc = torture_resume.start(cold, config)
            while torture_resume._progress_count(cold)[0] == 0:
                time.sleep(0.005)
            fresh.append(time.monotonic() - t0)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

            run = Path(tmp) / f"run{i}"
            config = torture_resume.write_config(run, cfg)
            proc = torture_resume.start(run, config)
            while torture_resume._progress_count(run)[1] < 12 + i:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            proc.wait()
            killed_at = torture_resume._progress_count(run)[1]
            n0 = torture_resume._progress_count(run)[0]
            proc = torture_resume.start(run, config)
            while torture_resume._progress_count(run)[0] == n0:
                time.sleep(0.005)
            recover.append(time.monotonic() - t_kill)
            resumed_step = torture_resume._progress_count(run)[1]
            lost.append(killed_at - (resumed_step - 1))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    fresh.sort()
    recover.sort()
    out = {
        "kills": kills,
        "cold_start_to_first_progress_s_median": round(fresh[len(fresh) // 2], 2),
        "kill_to_first_progress_s_median": round(recover[len(recover) // 2], 2),
        "ratio_recovery_vs_cold_start": round(recover[len(recover) // 2] / fresh[len(fresh) // 2], 3),
        "steps_redone_per_kill": lost,
    }
    return out


def _lora_training_state(layers: int) -> dict[str, Any]:
    """Model, optimizer (with Adam moments) and scheduler of a LoRA r=64 Llama of `layers` x 1024."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=64, lora_alpha=128, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": None}


def bench_verify(rounds: int, layers: int) -> dict[str, Any]:
    """Cost of choosing and loading a resume point, one recovery path vs the previous one."""
    import statistics

    from uff_port.core.checkpoint_store import CheckpointStore
    from uff_port.hashing import verify_tree
    from uff_port.training.state import (
        apply_snapshot,
        check_snapshot,
        read_snapshot,
        snapshot,
        snapshot_bytes,
        write_snapshot,
    )

    kw = _lora_training_state(layers)
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        store = CheckpointStore(tmp, keep_last=2)
        snap = snapshot(**kw, data_cursor={}, counters={}, step=1)
        staging = store.begin(1)
        write_snapshot(snap, staging)
        path = store.commit(staging, 1, {})
        size = snapshot_bytes(path)

        def load(p: Path) -> Any:
            s = read_snapshot(p)
            check_snapshot(s, model=kw["model"], optimizer=kw["optimizer"])
            return s

        def previous() -> None:
            # Before: the worker re-hashed against the manifest; the trainer read and applied.
            manifest = json.loads((path / "manifest.json").read_text())
            assert verify_tree(path, manifest["files"], exclude=["manifest.json"]).ok
            apply_snapshot(read_snapshot(path), **kw)

        def one_path(trusted: bool) -> None:
            # Now: the worker scans under the lock (symlink checks, re-hash) and hands the lock
            # and its choice over; the trainer re-checks it (no re-hash while it is still the
            # newest, a full re-hash otherwise), loads, checks shapes, applies.
            worker = CheckpointStore(tmp)
            assert worker.acquire_writer(0.0)
            point = worker.find_resume_point()
            assert point is not None
            found = CheckpointStore(tmp).find_resume_point(load=load, trusted=point.path if trusted else None)
            worker.release_writer()
            assert found is not None
            apply_snapshot(found.state, **kw)

        def verify_previous() -> None:
            manifest = json.loads((path / "manifest.json").read_text())
            assert verify_tree(path, manifest["files"], exclude=["manifest.json"]).ok

        def verify_now() -> None:
            assert store.verify(path)[0] is not None

        variants = {
            "previous": previous,
            "one_path": lambda: one_path(True),
            "one_path_rehash": lambda: one_path(False),
            "verify_previous": verify_previous,
            "verify_now": verify_now,
        }
        for fn in variants.values():  # warm the page cache and the allocator
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):  # interleaved, order alternating
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)

    def stats(xs: list[float]) -> dict[str, float]:
        return {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4)}

    def ratio(a: str, b: str) -> dict[str, float]:
        per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return {"median": round(statistics.median(times[a]) / statistics.median(times[b]), 3),
                "per_round_min": round(min(per_round), 3), "per_round_max": round(max(per_round), 3)}

    return {
        "checkpoint_mb": round(size / 2**20, 1),
        "trainable_params": sum(p.numel() for p in kw["model"].parameters() if p.requires_grad),
        "rounds": rounds,
        **{name: stats(xs) for name, xs in times.items()},
        "ratio_one_path_vs_previous": ratio("one_path", "previous"),
        "ratio_one_path_rehash_vs_previous": ratio("one_path_rehash", "previous"),
        "ratio_verify_now_vs_previous": ratio("verify_now", "verify_previous"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=("data", "blocked", "recovery", "verify", "all"))
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--full-cap", type=int, default=0, help="cap on lines re-iterated through the full pipeline (0: all of them)")
    parser.add_argument("--steps", type=int, default=60, help="training steps for `blocked`")
    parser.add_argument("--every", type=int, default=10, help="checkpoint interval (steps) for `blocked`")
    parser.add_argument("--kills", type=int, default=3, help="kills for `recovery`")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for `verify`")
    parser.add_argument("--layers", type=int, default=4, help="Llama layers (1024 wide, LoRA r=64) for `verify`")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count()}
    if args.part in ("data", "all"):
        out["data"] = bench_data(args.lines, args.full_cap)
    if args.part in ("blocked", "all"):
        out["blocked"] = bench_blocked(args.steps, args.every)
    if args.part in ("recovery", "all"):
        out["recovery"] = bench_recovery(args.kills)
    if args.part in ("verify", "all"):
        out["verify"] = bench_verify(args.rounds, args.layers)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
