"""Fuzz the decoder and dispatcher in-process: 100,000 random and mutated frames.

Every frame must produce exactly one reply (or a coded error), never an
exception, never a hang. The dispatcher runs for real (Worker.dispatch) with
its output going to a pipe that a thread drains and decodes.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from pathlib import Path

import msgpack

from uff_port.protocol.framing import FrameReader, decode_payload
from uff_port.server.worker import ServeOptions, Worker

N_FRAMES = 100_000
TIME_BUDGET_S = 120.0

SEEDS = [
    {"id": 1, "cmd": "ping"},
    {"id": 2, "cmd": "ping", "args": {"echo": [1, 2.5, "x", b"y", None, True]}},
    {"id": 3, "cmd": "status"},
    {"id": 4, "cmd": "stop", "args": {"checkpoint": False}},
    {"id": 5, "cmd": "checkpoint"},
    {"id": 6, "cmd": "resume", "args": {"run_dir": "r", "checkpoint": 3}},
    {"id": 7, "cmd": "train", "args": {"config": {"lora": {"r": 0}}, "overrides": {"x.y": 1}}},
    {"id": 8, "cmd": "nope", "args": {}},
]
SAFE_CMDS = ["ping", "status", "stop", "checkpoint", "resume", "nope", "", "PING", "bench_events"]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e308])
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(8)))
    if kind == 5:
        return rng.randbytes(rng.randrange(8))
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_random_value(rng, depth + 1))[:8]: _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _frame(rng: random.Random) -> bytes:
    mode = rng.randrange(4)
    if mode == 0:  # random bytes
        return rng.randbytes(rng.randrange(1, 64))
    if mode == 1:  # random structured request
        obj = {"id": _random_value(rng), "cmd": rng.choice(SAFE_CMDS), "args": _random_value(rng)}
        for key in list(obj):
            if rng.random() < 0.2:
                del obj[key]
        if rng.random() < 0.1:
            obj[rng.choice(["x", "event", "seq"])] = _random_value(rng)
        return msgpack.packb(obj, use_bin_type=True)
    if mode == 2:  # mutated valid request
        data = bytearray(msgpack.packb(rng.choice(SEEDS), use_bin_type=True))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos]
            else:
                data.insert(pos, rng.randrange(256))
        return bytes(data)
    return msgpack.packb(_random_value(rng), use_bin_type=True)


def test_fuzz_decoder_and_dispatcher(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    r, w = os.pipe()
    worker = Worker(ServeOptions(runs_root=tmp_path / "runs", heartbeat_interval=5))
    worker.attach(w)
    replies: list[dict] = []
    done = threading.Event()

    def drain() -> None:
        reader = FrameReader(r, max_frame_bytes=1 << 26)
        while (payload := reader.read()) is not None:
            frame = decode_payload(payload)
            if "event" not in frame:
                replies.append(frame)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    start = time.monotonic()
    sent = 0
    for _ in range(N_FRAMES):
        worker.handle_payload(_frame(rng))
        sent += 1
        assert time.monotonic() - start < TIME_BUDGET_S, "fuzz run too slow: a hang?"
    os.close(w)
    assert done.wait(30)
    assert sent == N_FRAMES
    # Exactly one reply per frame: either a result or a coded error.
    assert len(replies) == N_FRAMES
    codes = {}
    for reply in replies:
        assert reply["ok"] in (True, False)
        if not reply["ok"]:
            assert reply["error"]["code"] and reply["error"]["message"]
            codes[reply["error"]["code"]] = codes.get(reply["error"]["code"], 0) + 1
    assert "internal" not in codes, codes
    assert worker.slot.job is None and not worker.slot.starting  # no fuzzed frame started a trainer
    assert {"malformed_frame", "invalid_request", "unknown_command", "invalid_args"} <= set(codes)


def test_fuzz_frame_reader_stream(tmp_path: Path) -> None:
    """Random byte streams through the real FrameReader: it ends, never hangs or raises wildly."""
    rng = random.Random(7)
    for _ in range(300):
        parts = []
        for _ in range(rng.randrange(1, 20)):
            if rng.random() < 0.7:
                payload = _frame(rng)
                parts.append(struct.pack(">I", len(payload)) + payload)
            else:
                parts.append(rng.randbytes(rng.randrange(1, 12)))
        data = b"".join(parts)
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        reader = FrameReader(r, max_frame_bytes=4096)
        for _ in range(len(data) + 2):
            try:
                if reader.read() is None:
                    break
            except Exception as exc:  # only FrameError is allowed
                assert type(exc).__name__ == "FrameError", exc
                if exc.fatal:  # type: ignore[attr-defined]
                    break
        else:
            raise AssertionError("reader did not reach the end of a finite stream")
        os.close(r)
