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

Usage: .venv/bin/python scripts/bench_resume.py [data|blocked|recovery|all] [--lines N]
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
    from uff_port.training.config import validate_config
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


def bench_blocked(steps: int, every: int) -> dict[str, Any]:
    raise NotImplementedError


def bench_recovery(kills: int) -> dict[str, Any]:
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=("data", "blocked", "recovery", "all"))
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--full-cap", type=int, default=0, help="cap on lines re-iterated through the full pipeline (0: all of them)")
    parser.add_argument("--steps", type=int, default=60, help="training steps for `blocked`")
    parser.add_argument("--every", type=int, default=10, help="checkpoint interval (steps) for `blocked`")
    parser.add_argument("--kills", type=int, default=3, help="kills for `recovery`")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count()}
    if args.part in ("data", "all"):
        out["data"] = bench_data(args.lines, args.full_cap)
    if args.part in ("blocked", "all"):
        out["blocked"] = bench_blocked(args.steps, args.every)
    if args.part in ("recovery", "all"):
        out["recovery"] = bench_recovery(args.kills)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
