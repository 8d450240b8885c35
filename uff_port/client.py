"""A Python client of the worker: spawn `uff-port serve`, send requests, watch events.

Written from docs/protocol.md alone, the way any other client would be; used by
`uff-port client`, the tests and the benchmarks.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import IO, Any

from uff_port.protocol.framing import FrameReader, decode_payload, encode_frame

DEFAULT_TIMEOUT_S = 30.0
UNBOUNDED_TIMEOUT_S = 3600.0


class WorkerError(Exception):
    """An error reply: `code`, `message`, `details` exactly as the worker sent them."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class WorkerClient:
    def __init__(
        self,
        *,
        runs_root: str | os.PathLike[str] | None = None,
        heartbeat_interval: float | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stderr: int | IO[bytes] | None = None,
        python: str | None = None,
        hello_timeout: float = 30.0,
        argv: Sequence[str] | None = None,
        preexec_fn: Callable[[], Any] | None = None,
    ) -> None:
        cmd = list(argv) if argv else [python or sys.executable, "-m", "uff_port", "serve"]
        if runs_root is not None:
            cmd += ["--runs-root", str(runs_root)]
        if heartbeat_interval is not None:
            cmd += ["--heartbeat-interval", str(heartbeat_interval)]
        cmd += list(extra_args)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd,
            preexec_fn=preexec_fn,  # e.g. resource limits for a test that attacks the worker
        )
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.unmatched: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self.closed = False
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._reader = threading.Thread(target=self._read_loop, name="client-reader", daemon=True)
        self._reader.start()
        self.hello = self.wait_event("hello", timeout=hello_timeout)

    # -- reading ---------------------------------------------------------------
    def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        reader = FrameReader(self.proc.stdout.fileno(), max_frame_bytes=1 << 31)
        try:
            while True:
                payload = reader.read()
                if payload is None:
                    break
                self._deliver(decode_payload(payload))
        except Exception as exc:  # a broken stream is a test failure, make it visible
            with self._cond:
                self.unmatched.append({"stream_error": repr(exc)})
        finally:
            with self._cond:
                self.closed = True
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(EOFError("worker closed its stdout"))
                self._cond.notify_all()

    def _deliver(self, frame: dict[str, Any]) -> None:
        with self._cond:
            if "event" in frame:
                self.events.append(frame)
                listeners = list(self._listeners)
            else:
                listeners = []
                self.replies.append(frame)
                fut = self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
                if fut is not None:
                    fut.set_result(frame)
                else:
                    self.unmatched.append(frame)
            self._cond.notify_all()
        for listener in listeners:
            listener(frame)

    def on_event(self, listener: Callable[[dict[str, Any]], None]) -> None:
        with self._cond:
            self._listeners.append(listener)

    # -- writing ---------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.send_raw(encode_frame(frame))

    def deadline(self, cmd: str) -> float:
        """How long to wait for `cmd`'s reply: the deadline hello's `command_info` promises for it.

        A fixed 30 s would cut off a `train` that waits out a predecessor's grace period (up
        to 130 s by default); a long-running command with no promised bound (`eval`) gets an
        hour, a command the worker did not describe 30 s.
        """
        info = (getattr(self, "hello", None) or {}).get("command_info", {}).get(cmd)
        if not isinstance(info, dict):
            return DEFAULT_TIMEOUT_S
        deadline = info.get("deadline_s")
        if isinstance(deadline, (int, float)):
            return float(deadline)
        return UNBOUNDED_TIMEOUT_S if info.get("long_running") else DEFAULT_TIMEOUT_S

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a request and return the raw reply frame (timeout: default `deadline(cmd)`)."""
        timeout = self.deadline(cmd) if timeout is None else timeout
        rid = next(self._ids)
        fut: Future[dict[str, Any]] = Future()
        with self._cond:
            self._pending[rid] = fut
        frame: dict[str, Any] = {"id": rid, "cmd": cmd}
        if args is not None:
            frame["args"] = args
        self.send_frame(frame)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            with self._cond:
                self._pending.pop(rid, None)
            raise TimeoutError(f"no reply to {cmd!r} (id {rid}) within {timeout}s") from None

    def request(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a request; return `result` or raise WorkerError."""
        reply = self.call(cmd, args, timeout)
        if reply.get("ok"):
            return reply.get("result") or {}
        err = reply.get("error") or {}
        raise WorkerError(err.get("code", "?"), err.get("message", ""), err.get("details"))

    # -- events ----------------------------------------------------------------
    def wait_event(
        self,
        match: str | Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """First event (from index `since` of self.events) matching a name or predicate."""
        pred = (lambda e: e.get("event") == match) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if pred(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    what = match if isinstance(match, str) else "matching event"
                    raise TimeoutError(f"no {what} within {timeout}s (closed={self.closed})")
                self._cond.wait(remaining)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    # -- lifetime --------------------------------------------------------------
    def close_stdin(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def shutdown(self, timeout: float = 120.0) -> int:
        try:
            self.request("shutdown", timeout=timeout)
        except (WorkerError, EOFError, TimeoutError, OSError):
            pass
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.close_stdin()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn_worker(runs_root: Path, **kwargs: Any) -> WorkerClient:
    return WorkerClient(runs_root=runs_root, **kwargs)
