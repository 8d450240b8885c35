"""`python -m uff_port.cloud run ...`: the cloud job process the worker starts.

    python -m uff_port.cloud run --run-dir D --config D/config.yaml \
        --control-fd N [--job-id ID]

Speaks exactly the trainer's channel (docs/internals.md section 1): events
out; `status`, `checkpoint` and `stop` in, answered with `reply_to`. EOF on
the channel (or SIGTERM) means the worker is gone: the remote job is *not*
cancelled, the journal is already durable, and we exit 75; the next `train`
on the same run directory picks the job up from the journal.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from uff_port.cloud.credentials import known_secrets, redact
from uff_port.cloud.factory import local_gpu_present, make_backend
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun, Control
from uff_port.cloud.settings import validate_cloud
from uff_port.cloud.timescale import ScaledBackend, ScaledClock, time_scale
from uff_port.core import layout
from uff_port.core.config import ConfigError, load_config
from uff_port.core.exits import ExitCode
from uff_port.protocol import (
    ErrorCode,
    FrameError,
    FrameReader,
    FrameWriter,
    decode_payload,
    failed_fields,
)


def _scrub(obj: Any, secrets: list[str]) -> Any:
    """No credential ever leaves in an event, whatever a provider message held."""
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {k: _scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v, secrets) for v in obj]
    return obj


class Channel:
    def __init__(self, fd: int | None) -> None:
        self.writer = FrameWriter(fd) if fd is not None else None
        self.fd = fd
        self.secrets = known_secrets()

    def send(self, obj: dict[str, Any]) -> None:
        obj = _scrub(obj, self.secrets)
        if self.writer is None:
            print(json.dumps(obj, default=str), file=sys.stderr, flush=True)
            return
        try:
            self.writer.write(obj)
        except OSError:
            pass  # worker gone: the reader thread sees EOF and detaches us

    def emit(self, event: str, **fields: Any) -> None:
        self.send({"event": event, "ts": time.time(), **fields})

    def reply(self, rid: Any, result: dict[str, Any] | None = None, error: tuple[str, str] | None = None) -> None:
        if error is None:
            self.send({"reply_to": rid, "ok": True, "result": result or {}})
        else:
            self.send({"reply_to": rid, "ok": False, "error": {"code": error[0], "message": error[1], "details": None}})


def _serve_channel(channel: Channel, run: CloudRun, control: Control) -> None:
    assert channel.fd is not None
    reader = FrameReader(channel.fd)
    while True:
        try:
            payload = reader.read()
        except FrameError as exc:
            if exc.fatal:
                break
            continue
        if payload is None:
            break
        try:
            msg = decode_payload(payload)
        except FrameError:
            continue
        rid, cmd = msg.get("id"), msg.get("cmd")
        if cmd == "status":
            channel.reply(rid, run.status())
        elif cmd == "checkpoint":
            ck = run.local_checkpoint()
            if ck is None:
                channel.reply(rid, error=(ErrorCode.NOT_AVAILABLE, "no verified checkpoint has come home from the cloud yet"))
            else:
                channel.reply(rid, {"step": ck[0], "path": str(ck[1]), "source": "cloud"})
        elif cmd == "stop":
            control.stop_reply = lambda result, rid=rid: channel.reply(rid, result)
            raw_args = msg.get("args")
            control.cancel = bool(raw_args.get("cancel", False)) if isinstance(raw_args, dict) else False
            control.stop = True
            control.wake.set()
        else:
            channel.reply(rid, error=(ErrorCode.UNKNOWN_COMMAND, f"cloud job: unknown command {cmd!r}"))
    control.detach = True
    control.wake.set()


def cmd_run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    channel = Channel(args.control_fd)
    try:
        cfg = load_config(args.config or run_dir / layout.CONFIG)
        settings = validate_cloud(cfg.cloud)
    except ConfigError as exc:
        channel.emit("failed", **failed_fields(ErrorCode.INVALID_CONFIG, str(exc), resumable=False))
        return ExitCode.REFUSED
    key = os.environ.get(settings.encryption.key_env)
    if key:
        channel.secrets.append(key)  # the corpus key never leaves in an event either
    run_id = args.job_id or run_dir.name
    ledger = QuotaLedger(settings.ledger_path or run_dir.parent / ".cloud-ledger.jsonl", settings.budgets)
    control = Control()
    try:
        scale = time_scale()  # simulations and tests only (uff_port.cloud.timescale)
    except ValueError as exc:
        channel.emit("failed", **failed_fields(ErrorCode.INVALID_CONFIG, str(exc), resumable=False))
        return ExitCode.REFUSED

    def factory(name: str) -> Any:
        backend = make_backend(name, settings, run_id, run_dir / layout.CLOUD / "work")
        return ScaledBackend(backend, scale) if scale else backend

    run = CloudRun(
        run_dir,
        cfg,
        settings,
        run_id=run_id,
        backend_factory=factory,
        ledger=ledger,
        emit=channel.emit,
        gpu_present=local_gpu_present(settings),
        control=control,
        clock=ScaledClock(scale) if scale else time.time,
        time_scale=scale or 1.0,
    )

    def on_term(_signum: int, _frame: Any) -> None:
        # The worker is going away: keep the remote job, leave at the next pass.
        control.detach = True
        control.wake.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if args.control_fd is not None:
        threading.Thread(target=_serve_channel, args=(channel, run, control), daemon=True, name="channel").start()
    channel.emit("state", state="cloud", strategy=cfg.strategy, run_id=run_id)
    rc = run.run()
    if rc == -1:
        return _exec_local(args)
    return rc


def _exec_local(args: argparse.Namespace) -> int:
    """Hybrid with a local GPU: become the ordinary trainer on the same channel."""
    argv = [sys.executable, "-m", "uff_port.training", "--run-dir", str(args.run_dir)]
    if args.config:
        argv += ["--config", str(args.config)]
    argv += ["--set", "strategy=local"]  # routed here: this run trains on the local GPU
    if args.control_fd is not None:
        os.set_inheritable(args.control_fd, True)
        argv += ["--control-fd", str(args.control_fd)]
    if args.job_id:
        argv += ["--job-id", args.job_id]
    os.execv(sys.executable, argv)
    return ExitCode.CRASH  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uff_port.cloud")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="drive a run's cloud sessions (started by the worker)")
    run.add_argument("--run-dir", required=True)
    run.add_argument("--config", default=None)
    run.add_argument("--control-fd", type=int, default=None)
    run.add_argument("--job-id", default=None)
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
