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
   interleaved rounds, median and spread.

    python scripts/bench_registry.py [--events 100000] [--adapter-mb 64] [--moves 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def _best(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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

        base = _best(naive_manifest)
        ours = _best(lambda: write_run_manifest(run))
        print(f"write_run_manifest ({args.events} events, {args.adapter_mb} MiB): "
              f"{ours * 1000:.0f} ms vs naive {base * 1000:.0f} ms, ratio {ours / base:.2f}")

        manifest = load_manifest(run / "final")
        n = [0]

        def copy_then_hash() -> None:
            n[0] += 1
            dest = root / f"copy-{n[0]}"
            shutil.copytree(run / "final", dest)
            for f in dest.iterdir():
                fsync_file(f)
            tree_manifest(dest)

        def register() -> None:
            n[0] += 1
            with Registry(root / f"reg-{n[0]}") as reg:
                reg.register(run / "final", manifest)

        base = _best(copy_then_hash)
        ours = _best(register)
        print(f"register ({args.adapter_mb} MiB, durable): {ours * 1000:.0f} ms vs copytree+hash "
              f"{base * 1000:.0f} ms (fsynced too), ratio {ours / base:.2f}")

        with Registry(root / "reg-cas") as reg:
            reg.register(run / "final", manifest)
            aid = manifest.artifact_id
            start = time.perf_counter()
            current = None
            for _ in range(args.moves):
                new = None if current else aid
                reg.move_aliases("textgen", {"stable": new}, {"stable": current}, "promote")
                current = new
            ours = (time.perf_counter() - start) / args.moves
        start = time.perf_counter()
        for i in range(args.moves):
            atomic_write_json(root / "aliases.json", {"textgen": {"stable": aid if i % 2 else None}})
        base = (time.perf_counter() - start) / args.moves
        print(f"alias CAS + audit: {ours * 1000:.2f} ms/move vs atomic JSON rewrite {base * 1000:.2f} ms, "
              f"ratio {ours / base:.2f}")

        _bench_weight_scan(root / "weights", args.adapter_mb, args.rounds)


def _bench_weight_scan(where: Path, adapter_mb: int, rounds: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    where.mkdir()
    rng = np.random.default_rng(0)
    per = (adapter_mb << 20) // 4 // 64  # 64 float32 tensors, like a LoRA adapter's A/B pairs
    save_file({f"layer{i}.lora": rng.standard_normal(per, dtype=np.float32) for i in range(64)},
              str(where / "adapter_model.safetensors"))
    ratios, ours_t, base_t = [], [], []
    for _ in range(rounds):  # interleaved: the machine's load hits both alike
        t0 = time.perf_counter()
        tree_manifest(where)
        t1 = time.perf_counter()
        assert scan_tree(where).ok
        t2 = time.perf_counter()
        base_t.append(t1 - t0)
        ours_t.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    ratios.sort()
    med = ratios[len(ratios) // 2]
    print(f"NaN/Inf weight scan ({adapter_mb} MiB, {rounds} rounds): median {sorted(ours_t)[rounds // 2] * 1000:.0f} ms "
          f"vs sha256 pass {sorted(base_t)[rounds // 2] * 1000:.0f} ms, ratio {med:.2f} "
          f"(spread {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
