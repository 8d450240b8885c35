"""The real worker process, spoken to with real frames."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from uff_port.client import WorkerClient, WorkerError
from uff_port.protocol.framing import encode_frame

CORE = {"ping", "status", "train", "checkpoint", "resume", "stop", "shutdown"}
HELPERS = Path(__file__).parent / "helpers"


def test_hello_is_first_and_complete(worker: WorkerClient) -> None:
    hello = worker.events[0]
    assert hello["event"] == "hello" and hello["seq"] == 1
    assert hello["protocol"] == 1
    assert hello["pid"] == worker.pid
    assert CORE <= set(hello["commands"])
    info = hello["command_info"]
    assert list(info) == hello["commands"]
    assert info["ping"] == {"long_running": False, "deadline_s": None}
    # `train` may first wait out the grace period (100 s) for an orphaned trainer's checkpoint.
    assert info["train"]["long_running"] is True and info["train"]["deadline_s"] > 100
    assert all(i["deadline_s"] is None or i["deadline_s"] > 100 for i in info.values() if i["long_running"])
    assert hello["devices"] == [] or all("memory_total" in d for d in hello["devices"])
    assert isinstance(hello["ts"], float) and isinstance(hello["version"], str)


def test_ping_and_status(worker: WorkerClient) -> None:
    assert worker.request("ping", {"echo": {"x": [1, b"\x00"]}})["echo"] == {"x": [1, b"\x00"]}
    status = worker.request("status")
    for key in ("state", "job_id", "step", "max_steps", "loss", "last_checkpoint", "gpus", "host"):
        assert key in status
    assert status["state"] == "idle"
    assert status["host"]["memory_available"] > 0


def test_every_malformed_input_gets_a_coded_reply_and_the_worker_lives(worker: WorkerClient) -> None:
    cases = [
        (b"\xc1", "malformed_frame"),
        (msgpack.packb([1, 2, 3]), "invalid_request"),
        (msgpack.packb("hello"), "invalid_request"),
        (msgpack.packb({"id": 7}), "invalid_request"),
        (msgpack.packb({"id": 8, "cmd": "fly"}), "unknown_command"),
        (msgpack.packb({"id": 9, "cmd": "resume"}), "invalid_args"),
        (msgpack.packb({"id": 10, "cmd": "stop", "args": {"checkpoint": "yes"}}), "invalid_args"),
        (msgpack.packb({"id": 11, "cmd": "train", "args": {"config": {"lora": {"r": -1}}}}), "invalid_config"),
        (msgpack.packb({"id": 12, "cmd": "checkpoint"}), "no_job"),
    ]
    for payload, _ in cases:
        worker.send_raw(struct.pack(">I", len(payload)) + payload)
    deadline = time.monotonic() + 10
    while len(worker.unmatched) < len(cases) and time.monotonic() < deadline:
        time.sleep(0.01)
    codes = [r["error"]["code"] for r in worker.unmatched]
    assert codes == [code for _, code in cases]
    ids = [r["id"] for r in worker.unmatched]
    assert ids == [None, None, None, 7, 8, 9, 10, 11, 12]
    assert all(r["error"]["message"] for r in worker.unmatched)
    assert "args.run_dir" in worker.unmatched[5]["error"]["message"]
    assert "lora.r: must be > 0" in worker.unmatched[7]["error"]["message"]
    assert worker.request("ping")["pong"] is True


def test_oversized_frame_is_refused_without_killing(runs_root: Path) -> None:
    with WorkerClient(runs_root=runs_root, extra_args=["--max-frame-bytes", "1024"]) as w:
        blob = msgpack.packb({"id": 1, "cmd": "ping", "args": {"echo": "x" * 5000}})
        w.send_raw(struct.pack(">I", len(blob)) + blob)
        assert w.request("ping")["pong"] is True
        assert w.unmatched[0]["error"]["code"] == "frame_too_large"
        assert w.unmatched[0]["id"] is None
        assert w.shutdown() == 0


def test_truncated_frame_at_eof_is_answered_then_exit(runs_root: Path) -> None:
    with WorkerClient(runs_root=runs_root) as w:
        w.send_raw(struct.pack(">I", 100) + b"only a bit")
        w.close_stdin()
        assert w.wait(10) == 0
        assert w.unmatched and w.unmatched[0]["error"]["code"] == "truncated_frame"


def test_heartbeats_idle_with_increasing_seq(worker: WorkerClient) -> None:
    time.sleep(1.3)
    beats = worker.events_named("heartbeat")
    assert len(beats) >= 4
    for beat in beats:
        assert beat["state"] == "idle" and "gpus" in beat and "host" in beat and "last_progress_ts" in beat
    gaps = [b["ts"] - a["ts"] for a, b in zip(beats, beats[1:], strict=False)]
    assert all(0.1 < g < 0.5 for g in gaps), gaps
    seqs = [e["seq"] for e in worker.events]
    assert seqs == list(range(1, len(seqs) + 1))


def test_concurrent_callers_get_their_own_replies(worker: WorkerClient) -> None:
    results: dict[int, object] = {}

    def caller(n: int) -> None:
        for i in range(50):
            r = worker.request("ping", {"echo": [n, i]})
            assert r["echo"] == [n, i]
        results[n] = True

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8


def test_shutdown_replies_then_exits_zero(worker: WorkerClient) -> None:
    result = worker.request("shutdown")
    assert result["reason"] == "shutdown"
    assert worker.wait(10) == 0


def test_eof_exits_zero_when_idle(worker: WorkerClient) -> None:
    worker.close_stdin()
    assert worker.wait(10) == 0


def test_sigterm_when_idle_exits_zero(worker: WorkerClient) -> None:
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(10) == 0


def test_run_dir_is_confined(worker: WorkerClient) -> None:
    with pytest.raises(WorkerError) as exc:
        worker.request("train", {"config": {}, "run_dir": "../../etc"})
    assert exc.value.code == "invalid_args"
    assert "args.run_dir" in exc.value.message


def test_stdout_carries_frames_only(runs_root: Path) -> None:
    """Python prints, C printf/write and child processes all write to fd 1: no frame breaks."""
    argv = [sys.executable, str(HELPERS / "noisy_worker.py"), str(runs_root)]
    with WorkerClient(argv=argv, stderr=subprocess.DEVNULL) as w:
        for i in range(100):
            assert w.request("ping", {"echo": i})["echo"] == i
            time.sleep(0.02)
        assert w.shutdown() == 0
    assert not [u for u in w.unmatched if "stream_error" in u]
    assert len(w.events_named("heartbeat")) >= 10


def test_worker_never_imports_torch_and_starts_fast(runs_root: Path) -> None:
    code = (
        "import sys, time; t=time.perf_counter();"
        "import uff_port.cli, uff_port.server.worker, uff_port.core.config, uff_port.server.job_start;"
        "uff_port.cli.build_parser();"
        "print(time.perf_counter()-t); assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 1.0
    start = time.perf_counter()
    with WorkerClient(runs_root=runs_root) as w:
        elapsed = time.perf_counter() - start
        assert w.shutdown() == 0
    assert elapsed < 2.0, f"hello took {elapsed:.2f}s"


def test_bench_events_floods_in_order(worker: WorkerClient) -> None:
    result = worker.request("bench_events", {"count": 20000})
    assert result["count"] == 20000
    bench = worker.events_named("bench")
    assert [e["i"] for e in bench] == list(range(20000))


def test_frame_split_across_writes(worker: WorkerClient) -> None:
    data = encode_frame({"id": 5, "cmd": "ping", "args": {"echo": "split"}})
    for b in data:
        worker.send_raw(bytes([b]))
    deadline = time.monotonic() + 5
    while not worker.unmatched and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.unmatched[0]["result"]["echo"] == "split"


def test_config_that_cannot_fit_is_refused_before_starting(worker: WorkerClient) -> None:
    with pytest.raises(WorkerError) as exc:
        worker.request(
            "train",
            {
                "config_path": "deepseek-coder-6.7b-qlora-16gb",  # a preset name with dots in it
                # device auto: on a machine without CUDA, a cuda config is refused as not_available first
                "overrides": {"lora.enabled": False, "quantization.mode": "none", "training.device": "auto"},
            },
        )
    assert exc.value.code == "wont_fit"
    assert "host RAM" in exc.value.message
    assert exc.value.details["estimate"]["fits"] is False
    assert worker.request("status")["state"] == "idle"


def test_unknown_preset_lists_the_presets(worker: WorkerClient) -> None:
    with pytest.raises(WorkerError) as exc:
        worker.request("train", {"config_path": "no-such-preset"})
    assert exc.value.code == "invalid_config" and "tiny" in exc.value.message


def test_the_client_waits_as_long_as_hello_promises_per_command(runs_root: Path) -> None:
    with WorkerClient(runs_root=runs_root, extra_args=["--grace-seconds", "7"]) as w:
        info = w.hello["command_info"]
        assert w.deadline("train") == info["train"]["deadline_s"] and w.deadline("train") > 7
        assert w.deadline("ping") == 30.0 and w.deadline("no_such_command") == 30.0
        assert w.deadline("eval") == 3600.0  # long-running with no promised bound
        w.request("ping")  # the default applies to real calls too
