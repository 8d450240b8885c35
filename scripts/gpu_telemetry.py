"""NVML figures as the worker reports them, for scripts/gpu_check.sh.

    python scripts/gpu_telemetry.py sample OUT.jsonl [--interval 1]   # until SIGTERM: one line per sample
    python scripts/gpu_telemetry.py heartbeat OUT.json [--count 3]    # a real worker's heartbeats

`sample` calls uff_port.telemetry.sample_gpus() (what the worker's telemetry
thread calls) and appends {"ts", "gpus": [...]} lines: the memory/utilisation
timeline of a whole GPU session. `heartbeat` starts the worker (`uff_port serve`),
waits for `--count` heartbeat events and writes them; with `--require-gpu` it
exits 1 unless every heartbeat names at least one GPU whose name, memory_used,
memory_total, util, temperature and power_w are all filled in.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_FIELDS = ("name", "memory_used", "memory_total", "util", "temperature", "power_w")


def sample(out: Path, interval: float) -> int:
    from uff_port.telemetry import sample_gpus

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with open(out, "a", encoding="utf-8") as fh:
        while not stop["now"]:
            fh.write(json.dumps({"ts": time.time(), "gpus": sample_gpus()}) + "\n")
            fh.flush()
            time.sleep(interval)
    return 0


def complete(gpus: list[dict[str, Any]]) -> bool:
    return bool(gpus) and all(g.get(k) is not None for g in gpus for k in GPU_FIELDS)


def heartbeat(out: Path, count: int, require_gpu: bool) -> int:
    from uff_port.client import WorkerClient

    with tempfile.TemporaryDirectory() as runs:
        with WorkerClient(runs_root=runs, heartbeat_interval=0.5) as w:
            beats = [w.wait_event("heartbeat", timeout=30, since=0)]
            while len(beats) < count:
                n = len(w.events)
                beats.append(w.wait_event("heartbeat", timeout=30, since=n))
            hello = w.hello
    result = {"hello": hello, "heartbeats": beats,
              "gpu_fields_complete": all(complete(b.get("gpus") or []) for b in beats)}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps({"gpus": beats[-1].get("gpus"), "complete": result["gpu_fields_complete"]}, default=str))
    return 1 if require_gpu and not result["gpu_fields_complete"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out", type=Path)
    s.add_argument("--interval", type=float, default=1.0)
    h = sub.add_parser("heartbeat")
    h.add_argument("out", type=Path)
    h.add_argument("--count", type=int, default=3)
    h.add_argument("--require-gpu", action="store_true")
    a = ap.parse_args()
    if a.cmd == "sample":
        return sample(a.out, a.interval)
    return heartbeat(a.out, a.count, a.require_gpu)


if __name__ == "__main__":
    sys.exit(main())
