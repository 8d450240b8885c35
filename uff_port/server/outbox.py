"""The worker's outgoing frame stream: replies and numbered events.

Every frame goes through one FrameWriter lock, and event `seq` numbers are
assigned under that same lock, so `seq` order is wire order. Chatty events
(`progress`, `log`) pass a rate limiter so a fast trainer cannot flood the
Port: progress is coalesced (the newest wins and is sent when the window
opens), excess log lines are counted and reported in one summary line.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

from uff_port.protocol.framing import FrameWriter, encode_frame

DEFAULT_PROGRESS_PER_S: Final = 20.0
DEFAULT_LOG_PER_S: Final = 200.0
LOG_BURST: Final = 500.0


class EventStream:
    def __init__(
        self,
        writer: FrameWriter,
        progress_per_s: float = DEFAULT_PROGRESS_PER_S,
        log_per_s: float = DEFAULT_LOG_PER_S,
    ) -> None:
        self._writer = writer
        self._seq = 0
        self._min_progress_gap = 1.0 / progress_per_s if progress_per_s > 0 else 0.0
        self._last_progress = 0.0
        self._pending_progress: dict[str, Any] | None = None
        self._log_rate = log_per_s
        self._log_tokens = LOG_BURST
        self._log_refill = time.monotonic()
        self._logs_dropped = 0
        self._limit_lock = threading.Lock()
        self.closed = False

    @property
    def seq(self) -> int:
        return self._seq

    def reply(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self._writer.write(frame)
        except OSError:
            self._lost_stdout()

    def _lost_stdout(self) -> None:
        """The reader of stdout is gone (its VM died): drop what follows, never raise.

        A raise here would kill the thread that relays the trainer's frames, and
        with it the worker's view of its trainer while it shuts down.
        """
        self.closed = True

    def emit(self, name: str, /, **fields: Any) -> None:
        """Send one event now (no rate limit): use for everything that must arrive."""
        if self.closed:
            return
        # The envelope keys come first on the wire and cannot be overwritten by fields.
        frame: dict[str, Any] = {"event": name, "seq": 0, "ts": fields.get("ts") or time.time()}
        frame.update(fields)
        frame["event"] = name
        with self._writer.lock:
            self._seq += 1
            frame["seq"] = self._seq
            try:
                self._writer.write_raw_locked(encode_frame(frame))
            except OSError:
                self._lost_stdout()

    def emit_limited(self, name: str, /, **fields: Any) -> None:
        """Send a chatty event through the rate limiter (progress, log)."""
        now = time.monotonic()
        if name == "progress":
            with self._limit_lock:
                if now - self._last_progress < self._min_progress_gap:
                    self._pending_progress = fields
                    return
                self._last_progress = now
                self._pending_progress = None
            self.emit(name, **fields)
            return
        if name == "log":
            with self._limit_lock:
                self._refill_logs(now)
                if self._log_tokens < 1.0:
                    self._logs_dropped += 1
                    return
                self._log_tokens -= 1.0
            self.emit(name, **fields)
            return
        self.emit(name, **fields)

    def _refill_logs(self, now: float) -> None:
        """Token bucket: refill at the log rate up to the burst; caller holds _limit_lock."""
        self._log_tokens = min(LOG_BURST, self._log_tokens + (now - self._log_refill) * self._log_rate)
        self._log_refill = now

    def flush_limited(self) -> None:
        """Send a coalesced progress event whose window has opened; called on a tick."""
        now = time.monotonic()
        pending = None
        dropped = 0
        with self._limit_lock:
            if self._pending_progress is not None and now - self._last_progress >= self._min_progress_gap:
                pending, self._pending_progress = self._pending_progress, None
                self._last_progress = now
            self._refill_logs(now)
            if self._logs_dropped and self._log_tokens >= 1.0:
                self._log_tokens -= 1.0
                dropped, self._logs_dropped = self._logs_dropped, 0
        if pending is not None:
            self.emit("progress", **pending)
        if dropped:
            self.emit("log", level="warning", message=f"{dropped} log events dropped by the rate limit", source="worker")

    def drain_progress(self) -> None:
        """Send any held-back progress right away (before a terminal event)."""
        with self._limit_lock:
            pending, self._pending_progress = self._pending_progress, None
        if pending is not None:
            self.emit("progress", **pending)
