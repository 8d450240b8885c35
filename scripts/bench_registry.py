#!/usr/bin/env python
"""Registry costs that sit on the worker's path, each as a ratio to a baseline run here.

1. write_run_manifest at job end, on a run with a long events.jsonl, against the
   naive way (json-parse every event line, hash the files).
2. register (verify source, copy while hashing, fsync, rename, one transaction)
   against shutil.copytree + fsync of each file + a separate sha256 pass.
3. promotion's alias compare-and-swap (SQLite BEGIN IMMEDIATE + audit row)
   against an atomic JSON rewrite of an aliases file (temp + fsync + rename).
4. the NaN/Inf scan of an adapter's weights (register and the `weights` gate)
   against the sha256 pass over the same files that register does anyway;

Every row: interleaved rounds (the side that goes first alternating), the
median of the per-round ratios ours/baseline and their spread.

    python scripts/bench_registry.py [--events 100000] [--adapter-mb 64] [--moves 200] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from uff_port.fsutil import atomic_write_json, fsync_file
from uff_port.hashing import tree_manifest
from uff_port.registry.manifest import load_manifest
from uff_port.registry.runmanifest import write_run_manifest
from uff_port.registry.store import Registry
from uff_port.registry.tensors import scan_tree


def _make_run(root: Path, events: int, adapter_mb: int) -> Path:
    run = root / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_model.safetensors").write_bytes(os.urandom(adapter_mb << 20))
    (run / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    (run / "config.yaml").write_text("name: bench\nmodel:\n  name_or_path: builtin:tiny-llama\n")
    with (run / "events.jsonl").open("w") as fh:
        fh.write(json.dumps({"event": "state", "state": "loading", "step": 0}) + "\n")
        for i in range(events):
            fh.write(json.dumps({"event": "progress", "ts": 1.0 + i, "step": i, "max_steps": events,
                                 "loss": 2.0, "lr": 1e-4, "tokens_per_s": 1234.5}) + "\n")
            if i % 1000 == 999:
                fh.write(json.dumps({"event": "eval", "step": i, "loss": 1.9}) + "\n")
        fh.write(json.dumps({"event": "finished", "step": events, "loss": 1.8, "eval_loss": 1.9}) + "\n")
    return run


def _rounds(name: str, ours, base, rounds: int, per: int = 1, unit: str = "ms") -> None:  # type: ignore[no-untyped-def]
    """Time `ours` and `base` in interleaved rounds; print medians and the per-round ratio's median and spread."""
    o_t, b_t, ratios = [], [], []
    for r in range(rounds):
        got = {}
        for side, fn in ((("ours", ours), ("base", base)) if r % 2 == 0 else (("base", base), ("ours", ours))):
            start = time.perf_counter()
            fn()
            got[side] = (time.perf_counter() - start) / per
        o_t.append(got["ours"])
        b_t.append(got["base"])
        ratios.append(got["ours"] / got["base"])
    scale = 1000.0
    fmt = ".2f" if unit == "ms/move" else ".0f"
    print(f"| {name} | {statistics.median(o_t) * scale:{fmt}} {unit} | {statistics.median(b_t) * scale:{fmt}} {unit} | "
          f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--adapter-mb", type=int, default=64)
    ap.add_argument("--moves", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        root = Path(tmp)
        run = _make_run(root, args.events, args.adapter_mb)

        def naive_manifest() -> None:
            with (run / "events.jsonl").open() as fh:
                [json.loads(line) for line in fh]
            tree_manifest(run / "final")

        print(f"{args.rounds} interleaved rounds; {args.events} events, {args.adapter_mb} MiB adapter, "
              f"{args.moves} alias moves per round")
        print()
        print("| operation (ours vs baseline) | ours (median) | baseline (median) | ours/baseline, median (min-max) |")
        print("|---|---|---|---|")
        _rounds("`write_run_manifest` at job end vs json-parse every event line + hash the files",
                lambda: write_run_manifest(run), naive_manifest, args.rounds)

        manifest = load_manifest(run / "final")
        n = [0]

        def copy_then_hash() -> None:
            n[0] += 1
            dest = root / f"copy-{n[0]}"
            shutil.copytree(run / "final", dest)
            for f in dest.iterdir():
                fsync_file(f)
            tree_manifest(dest)
            shutil.rmtree(dest)

        def register() -> None:
            n[0] += 1
            with Registry(root / f"reg-{n[0]}") as reg:
                reg.register(run / "final", manifest)
            shutil.rmtree(root / f"reg-{n[0]}")

        _rounds("`register` (durable: fsync, rename, one transaction) vs `shutil.copytree` + fsync each file + "
                "sha256 pass", register, copy_then_hash, args.rounds)

        with Registry(root / "reg-cas") as reg:
            reg.register(run / "final", manifest)
            aid = manifest.artifact_id
            current: list[str | None] = [None]

            def cas() -> None:
                for _ in range(args.moves):
                    new = None if current[0] else aid
                    reg.move_aliases("textgen", {"stable": new}, {"stable": current[0]}, "promote")
                    current[0] = new

            def json_rewrite() -> None:
                for i in range(args.moves):
                    atomic_write_json(root / "aliases.json", {"textgen": {"stable": aid if i % 2 else None}})

            _rounds("alias compare-and-swap + audit row (SQLite `BEGIN IMMEDIATE`) vs atomic rewrite of an "
                    "aliases JSON file (temp + fsync + rename)", cas, json_rewrite, args.rounds, per=args.moves,
                    unit="ms/move")

        _bench_weight_scan(root / "weights", args.adapter_mb, args.rounds)


def _bench_weight_scan(where: Path, adapter_mb: int, rounds: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    where.mkdir()
    rng = np.random.default_rng(0)
    per = (adapter_mb << 20) // 4 // 64  # 64 float32 tensors, like a LoRA adapter's A/B pairs
    save_file({f"layer{i}.lora": rng.standard_normal(per, dtype=np.float32) for i in range(64)},
              str(where / "adapter_model.safetensors"))
    _rounds("NaN/Inf scan of an fp32 adapter (`register`'s door check, the `weights` gate) vs the sha256 pass "
            "over the same file", lambda: scan_tree(where), lambda: tree_manifest(where), rounds)


if __name__ == "__main__":
    main()
