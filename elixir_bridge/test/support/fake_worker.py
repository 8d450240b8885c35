"""Misbehaving stand-ins for `uff-port serve`, used only by the bridge's tests and bench.

Usage: python fake_worker.py MODE
  garbage            hello, then answer the first request with a frame that is not MessagePack
  crash_after_hello  hello, read the job's `train` (up to 5 s), a line on stderr, exit 3
  die_after_hello    close stdin, a line on stderr, hello, exit 3 after 0.3 s: the bridge's
                     `train` meets a closed pipe (EPIPE) and no exit status ever arrives
  silent             never say hello
  slow_train DELAY DEADLINE
                     hello announcing `train`'s deadline_s DEADLINE (command_info), then answer
                     `train` after DELAY seconds and anything else at once; exit 0 after `shutdown`
                     (a worker waiting out an orphaned trainer's grace period before it replies)
  echo               a bare {packet,4} echo (no decoding): the bench's baseline
"""

from __future__ import annotations

import os
import select
import struct
import sys
import time

import msgpack


def read_frame(fd: int) -> bytes | None:
    head = os.read(fd, 4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def write_frame(payload: bytes) -> None:
    os.write(1, struct.pack(">I", len(payload)) + payload)


def hello(command_info: dict[str, dict[str, object]] | None = None) -> None:
    frame = {"event": "hello", "seq": 1, "ts": time.time(), "protocol": 1, "version": "fake",
             "pid": os.getpid(), "commands": ["ping", *(command_info or {})], "devices": []}
    if command_info is not None:
        frame["command_info"] = command_info
    write_frame(msgpack.packb(frame))


def slow_train(delay: float, deadline: float) -> int:
    hello({"train": {"long_running": True, "deadline_s": deadline},
           "shutdown": {"long_running": True, "deadline_s": None}})
    while (payload := read_frame(0)) is not None:
        request = msgpack.unpackb(payload)
        cmd = request.get("cmd")
        if cmd == "train":
            time.sleep(delay)
            result: dict[str, object] = {"job_id": "fake", "run_dir": "fake", "resumed_from": None}
        else:
            result = {"pong": True} if cmd == "ping" else {"reason": cmd}
        write_frame(msgpack.packb({"id": request["id"], "ok": True, "result": result}))
        if cmd == "shutdown":
            return 0
    return 0


def main() -> int:
    mode = sys.argv[1]
    if mode == "echo":
        # Buffered like the worker's own reader: one read syscall per frame, one write.
        inp, out = sys.stdin.buffer, sys.stdout.buffer
        while len(head := inp.read(4)) == 4:
            out.write(head + inp.read(struct.unpack(">I", head)[0]))
            out.flush()
        return 0
    if mode == "slow_train":
        return slow_train(float(sys.argv[2]), float(sys.argv[3]))
    if mode == "silent":
        time.sleep(3600)
        return 0
    if mode == "die_after_hello":
        os.close(0)
        print("fake worker: died before reading its job", file=sys.stderr, flush=True)
        hello()
        time.sleep(0.3)
        return 3
    hello()
    if mode == "crash_after_hello":
        # Dies while loading, after the job's `train` arrived: exiting before reading it
        # would let the bridge's write meet a closed pipe, and an EPIPE closes the Port
        # before the exit status can arrive (the test checks the status and stderr).
        if select.select([0], [], [], 5.0)[0]:
            read_frame(0)
        print("fake worker: simulated CUDA error at load", file=sys.stderr, flush=True)
        return 3
    if mode == "garbage":
        if read_frame(0) is not None:
            write_frame(b"\xc1\xc1\xc1")
        while read_frame(0) is not None:
            pass
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    raise SystemExit(main())
