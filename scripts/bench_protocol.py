#!/usr/bin/env python3
"""Round-trip latency of `ping`/`status` through the worker vs a bare msgpack echo, and events/s.

Both processes are spawned in the same invocation, over the same kind of pipes,
driven by the same synchronous client, interleaved in rounds so machine noise
hits both alike. Usage:

    python scripts/bench_protocol.py [--n 5000] [--rounds 5] [--events 200000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import time

import msgpack

ECHO = r"""
import os, struct, msgpack
r, w = 0, 1
buf = b""
def read_exact(n):
    global buf
    while len(buf) < n:
        chunk = os.read(r, 65536)
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    out, buf = buf[:n], buf[n:]
    return out
while True:
    (n,) = struct.unpack(">I", read_exact(4))
    req = msgpack.unpackb(read_exact(n), raw=False)
    body = msgpack.packb({"id": req["id"], "ok": True, "result": {"pong": True}}, use_bin_type=True)
    os.write(w, struct.pack(">I", len(body)) + body)
"""


class SyncClient:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.r = self.proc.stdout.fileno()  # type: ignore[union-attr]
        self.w = self.proc.stdin.fileno()  # type: ignore[union-attr]
        self.buf = b""
        self.ids = 0

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read(self) -> dict:
        (n,) = struct.unpack(">I", self._exact(4))
        return msgpack.unpackb(self._exact(n), raw=False)

    def call(self, cmd: str, args: dict | None = None) -> dict:
        self.ids += 1
        req = {"id": self.ids, "cmd": cmd}
        if args:
            req["args"] = args
        body = msgpack.packb(req, use_bin_type=True)
        os.write(self.w, struct.pack(">I", len(body)) + body)
        while True:
            frame = self.read()
            if frame.get("id") == self.ids and "event" not in frame:
                return frame

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(30)


def timed(client: SyncClient, cmd: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        client.call(cmd)
        out.append((time.perf_counter_ns() - t) / 1000.0)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="requests per round and process")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs-root", default="/tmp/uff-bench-runs")
    opts = ap.parse_args()
    echo = SyncClient([sys.executable, "-c", ECHO])
    worker = SyncClient(
        [sys.executable, "-m", "uff_port", "serve", "--heartbeat-interval", "3600", "--runs-root", opts.runs_root]
    )
    worker.read()  # hello
    for c in (echo, worker):
        timed(c, "ping", 500)  # warm-up
    lat: dict[str, list[float]] = {"echo": [], "ping": [], "status": []}
    per_round: list[float] = []
    for r in range(opts.rounds):  # interleaved, the side that goes first alternating
        order = ("echo", "ping") if r % 2 == 0 else ("ping", "echo")
        got = {}
        for side in order:
            got[side] = timed(echo if side == "echo" else worker, "ping", opts.n)
            lat[side] += got[side]
        lat["status"] += timed(worker, "status", max(1, opts.n // 5))
        per_round.append(pct(got["ping"], 0.5) / pct(got["echo"], 0.5))
    print(f"round trips over pipes, {opts.rounds} rounds x {opts.n} (status: n/5), microseconds")
    print(f"{'':10} {'p50':>8} {'p99':>8} {'mean':>8}")
    for name, xs in lat.items():
        print(f"{name:10} {pct(xs, .5):8.1f} {pct(xs, .99):8.1f} {statistics.fmean(xs):8.1f}")
    ratio50 = statistics.median(per_round)
    ratio99 = pct(lat["ping"], 0.99) / pct(lat["echo"], 0.99)
    print(f"ping/echo p50 ratio: median of {opts.rounds} rounds {ratio50:.2f}x "
          f"(min {min(per_round):.2f}x, max {max(per_round):.2f}x; target <= 1.5x); pooled p99 ratio {ratio99:.2f}x")

    t = time.perf_counter()
    reply_id = worker.ids + 1
    body = msgpack.packb({"id": reply_id, "cmd": "bench_events", "args": {"count": opts.events}})
    os.write(worker.w, struct.pack(">I", len(body)) + body)
    got = 0
    while True:
        frame = worker.read()
        if frame.get("event") == "bench":
            got += 1
        elif frame.get("id") == reply_id:
            break
    wall = time.perf_counter() - t
    worker.ids = reply_id
    inside = frame["result"]["events_per_s"]
    print(f"events: {got} received; worker emits {inside:,.0f}/s; end to end incl. client decode {got / wall:,.0f}/s "
          f"(target >= 50,000/s)")
    echo.close()
    worker.close()
    return 0 if ratio50 <= 1.5 and inside >= 50_000 else 1


if __name__ == "__main__":
    sys.exit(main())
