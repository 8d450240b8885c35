"""Event stream: seq order, rate limits, and telemetry that never fails."""

from __future__ import annotations

import os
import sys
import threading
import time
import types

from uff_port.protocol.framing import FrameReader, FrameWriter, decode_payload
from uff_port.server.outbox import EventStream
from uff_port.telemetry import gpu as gpu_mod
from uff_port.telemetry import sample_gpus, sample_host


def _collect(r: int, out: list[dict], done: threading.Event) -> None:
    reader = FrameReader(r)
    while (payload := reader.read()) is not None:
        out.append(decode_payload(payload))
    done.set()


def _stream(**kw: float) -> tuple[EventStream, list[dict], threading.Event, int]:
    r, w = os.pipe()
    out: list[dict] = []
    done = threading.Event()
    threading.Thread(target=_collect, args=(r, out, done), daemon=True).start()
    return EventStream(FrameWriter(w), **kw), out, done, w


def test_progress_flood_is_coalesced_and_newest_wins() -> None:
    events, out, done, w = _stream(progress_per_s=10)
    start = time.monotonic()
    for step in range(1, 20001):
        events.emit_limited("progress", step=step)
    elapsed = time.monotonic() - start
    events.drain_progress()
    os.close(w)
    done.wait(5)
    steps = [e["step"] for e in out]
    assert steps[-1] == 20000  # the newest is never lost
    assert len(steps) <= 10 * elapsed + 3  # at most the configured rate got through
    assert steps == sorted(steps)


def test_flush_sends_held_progress_when_window_opens() -> None:
    events, out, done, w = _stream(progress_per_s=20)
    events.emit_limited("progress", step=1)
    events.emit_limited("progress", step=2)  # held back
    time.sleep(0.06)
    events.flush_limited()
    os.close(w)
    done.wait(5)
    assert [e["step"] for e in out] == [1, 2]


def test_log_flood_is_limited_and_summarised() -> None:
    events, out, done, w = _stream(log_per_s=100)
    for i in range(5000):
        events.emit_limited("log", level="info", message=f"line {i}")
    time.sleep(0.05)
    events.flush_limited()
    os.close(w)
    done.wait(5)
    summary = [e for e in out if "dropped by the rate limit" in e.get("message", "")]
    assert len(out) < 1000
    assert summary and int(summary[0]["message"].split()[0]) + len(out) - 1 == 5000


def test_other_events_are_never_limited_and_seq_is_gapless() -> None:
    events, out, done, w = _stream(progress_per_s=1)
    threads = [
        threading.Thread(target=lambda: [events.emit("checkpoint", step=i) for i in range(2000)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(w)
    done.wait(5)
    assert len(out) == 8000
    assert [e["seq"] for e in out] == list(range(1, 8001))


def test_no_gpu_means_empty_list_not_an_error() -> None:
    assert sample_gpus() == [] or all("index" in g for g in sample_gpus())
    host = sample_host()
    assert host["memory_available"] > 0 and host["cpu_count"] >= 1


def test_gpu_fields_from_nvml(monkeypatch) -> None:
    """Against a stand-in for the pynvml module: our mapping of NVML's answers."""

    class Mem:
        used, total = 3 * 2**30, 16 * 2**30

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 5060 Ti",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetTemperature=lambda h, kind: 66,
        nvmlDeviceGetPowerUsage=lambda h: 151000,
        nvmlDeviceGetMemoryInfo=lambda h: Mem,
        NVML_TEMPERATURE_GPU=0,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_mod, "_state", {"init": None})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus = sample_gpus()
    assert gpus == [
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 5060 Ti",
            "util": 87.0,
            "temperature": 66.0,
            "power_w": 151.0,
            "memory_used": 3 * 2**30,
            "memory_total": 16 * 2**30,
        }
    ]

    def broken(h):
        raise RuntimeError("driver gone")

    fake.nvmlDeviceGetPowerUsage = broken
    assert sample_gpus()[0]["power_w"] is None  # one unreadable figure is nil, not a failure
    fake.nvmlDeviceGetCount = broken
    assert sample_gpus() == []


def test_fields_cannot_clobber_the_envelope() -> None:
    events, out, done, w = _stream()
    events.emit("artifact_registered", name="adapter", event="spoof", seq=999, ts=123.5)
    os.close(w)
    done.wait(5)
    assert out == [{"event": "artifact_registered", "seq": 1, "ts": 123.5, "name": "adapter"}]
