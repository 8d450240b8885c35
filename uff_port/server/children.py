"""Child processes of the worker: spawned in their own session, spoken to over a socketpair.

Each child (a trainer, a cloud runner, an extension task) gets one end of a
socketpair as an inherited fd and speaks the same {packet, 4} framing on it.
Its stdout+stderr go through a pipe that we copy to our stderr and to a log
file, keeping the last lines for crash reports. `start_new_session` gives it
its own process group, so teardown can kill everything it started at once.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import UnsafePath, open_confined
from uff_port.protocol.framing import FrameError, FrameReader, FrameWriter, decode_payload

STDERR_TAIL_LINES: Final = 40


class Child:
    def __init__(
        self,
        argv_before_fd: list[str],
        *,
        fd_flag: str = "--control-fd",
        extra_argv: list[str] | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        name: str = "child",
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.name = name
        self._sock = parent_sock
        child_fd = child_sock.fileno()
        argv = [*argv_before_fd, fd_flag, str(child_fd), *(extra_argv or [])]
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(child_fd, *pass_fds),
                start_new_session=True,  # own process group: killpg reaches all it starts
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env,
                close_fds=True,
            )
        finally:
            child_sock.close()
        self.pid = self.proc.pid
        self.pgid = self.proc.pid
        self.reader = FrameReader(parent_sock.fileno())
        self.writer = FrameWriter(parent_sock.fileno())
        self._log_path = log_path
        self._pump = threading.Thread(target=self._copy_output, name=f"{name}-output", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        """Copy the child's output to our stderr and its log; keep the tail."""
        assert self.proc.stdout is not None
        log = None
        if self._log_path:
            try:  # the run's own log: never appended through a symlink out of the run directory
                log = open_confined(self._log_path.parent, self._log_path, "ab")
            except (OSError, UnsafePath) as exc:
                print(f"{self.name}: not writing {self._log_path}: {exc}", file=sys.stderr, flush=True)
        try:
            for line in iter(self.proc.stdout.readline, b""):
                try:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                if log:
                    log.write(line)
                    log.flush()
                self.stderr_tail.append(line.decode("utf-8", "replace").rstrip("\n"))
        finally:
            if log:
                log.close()

    def send(self, frame: dict[str, Any]) -> bool:
        try:
            self.writer.write(frame)
            return True
        except OSError:
            return False

    def read_frames(self, on_frame: Callable[[dict[str, Any]], None]) -> str | None:
        """Deliver decoded frames until EOF; returns a reason string if the stream broke."""
        while True:
            try:
                payload = self.reader.read()
            except FrameError as exc:
                if exc.fatal:
                    return exc.message
                continue
            except OSError as exc:
                return str(exc)
            if payload is None:
                return None
            try:
                frame = decode_payload(payload)
            except FrameError:
                continue
            on_frame(frame)

    def close_channel(self) -> None:
        """Closing our end is EOF for the child: 'the worker is gone, save and exit'."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._pump.join(timeout=2)
        return code

    def signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False
