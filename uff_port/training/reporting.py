"""Where the trainer's events go: the worker's channel and RUN_DIR/events.jsonl.

Only rank 0 reports. Every event is appended to events.jsonl first (the record
that survives the worker), then sent on the channel. A broken channel is not
an error here: the loop learns of it as EOF from the reader thread.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from uff_port.core import layout
from uff_port.fsutil import UnsafePath, open_confined
from uff_port.protocol import FrameWriter, sanitize

EVENTS_FILE: Final = layout.EVENTS
# Events after which the file is fsynced: the ones a post-mortem must find.
_DURABLE: Final = frozenset({"checkpoint", "finished", "failed"})

Listener = Callable[[dict[str, Any]], None]


class Reporter:
    def __init__(
        self, run_dir: Path, *, channel_fd: int | None = None, rank: int = 0, job_id: str | None = None
    ) -> None:
        self.enabled = rank == 0
        self.path = Path(run_dir) / EVENTS_FILE
        self.writer = FrameWriter(channel_fd) if (channel_fd is not None and self.enabled) else None
        self.job_id = job_id
        self.listeners: list[Listener] = []
        self.channel_broken = False
        self.file_refused: str | None = None
        """Why events.jsonl is not written (a symlink or non-file planted there); the channel still is."""
        self.write_errors = 0
        self.last_write_error: OSError | None = None
        self._lock = threading.Lock()
        self._last_progress = 0.0
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._seal_torn_line()

    def _seal_torn_line(self) -> None:
        """End a line a killed predecessor left half-written, so ours starts on a fresh one."""
        try:
            with open_confined(self.path.parent, self.path, "rb+") as fh:
                if fh.seek(0, os.SEEK_END) and (fh.seek(-1, os.SEEK_END), fh.read(1))[1] != b"\n":
                    fh.write(b"\n")
        except FileNotFoundError:
            pass
        except UnsafePath as exc:
            self.file_refused = str(exc)

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = sanitize({"event": event, "ts": time.time(), **fields})
        if self.job_id is not None:
            rec.setdefault("job_id", self.job_id)
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        with self._lock:  # the checkpoint thread emits too
            self._append(line, durable=event in _DURABLE)
            self._send(rec)
        for listener in self.listeners:
            listener(rec)

    def _append(self, line: str, durable: bool) -> None:
        if self.file_refused is not None:
            return
        try:
            # Opened afresh each time, never through a symlink: one planted mid-run
            # must not turn our appends into writes to a file outside the run.
            with open_confined(self.path.parent, self.path, "a") as fh:
                fh.write(line)
                if durable:  # fsync: a post-mortem must find the checkpoint/finished/failed line
                    fh.flush()
                    os.fsync(fh.fileno())
        except UnsafePath as exc:
            self.file_refused = str(exc)
        except OSError as exc:
            # A full disk must not silence the worker: the event (a `failed` saying
            # `disk_full`, above all) still goes over the channel.
            self.write_errors += 1
            self.last_write_error = exc

    def progress(self, min_interval: float, force: bool = False, **fields: Any) -> bool:
        """Rate-limited at the source: at most one per `min_interval` seconds unless forced."""
        now = time.monotonic()
        if not force and now - self._last_progress < min_interval:
            return False
        self._last_progress = now
        self.emit("progress", **fields)
        return True

    def reply(self, req_id: Any, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        msg: dict[str, Any] = {"reply_to": req_id, "ok": error is None}
        if error is None:
            msg["result"] = result or {}
        else:
            msg["error"] = {"code": error.get("code", "internal"), "message": error.get("message", ""), "details": error.get("details")}
        with self._lock:
            self._send(sanitize(msg))

    def _send(self, msg: dict[str, Any]) -> None:
        if self.writer is None or self.channel_broken:
            return
        try:
            self.writer.write(msg)
        except OSError:  # worker gone; the reader thread reports EOF
            self.channel_broken = True


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All events of a run; a torn last line (crash mid-write) is skipped."""
    out: list[dict[str, Any]] = []
    path = Path(run_dir) / EVENTS_FILE
    try:
        fh = open_confined(path.parent, path, "rb")
    except (OSError, UnsafePath):  # absent, or a planted link: nothing of ours to read
        return out
    with fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
