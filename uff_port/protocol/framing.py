"""{packet, 4} framing: a 4-byte big-endian length, then one MessagePack map.

The reader never allocates a frame larger than its limit: it reads the header,
refuses, and skips the announced bytes in small chunks so the stream stays in
sync. The writer serialises whole frames under one lock so threads (replies,
heartbeats, forwarded trainer events) can never interleave bytes.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack

from uff_port.protocol.errors import ErrorCode

HEADER: Final = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
_READ_CHUNK: Final = 1 << 16


class FrameError(Exception):
    """A frame that could not be read or decoded; `code` is an ErrorCode."""

    def __init__(self, code: str, message: str, *, fatal: bool = False, details: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal  # True when the stream itself is unusable (EOF mid-frame).
        self.details = details


def sanitize(obj: Any) -> Any:
    """Make `obj` wire-safe: NaN/Inf become None, tuples become lists.

    Non-finite floats never go on the wire (contract): Elixir has no such floats.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj



# A non-finite float64 packs as 0xcb then 0x7ff.../0xfff...: if neither byte pair
# occurs, the payload holds none, and the common case skips the Python-level walk.
_NON_FINITE_MARKERS: Final = (b"\xcb\x7f", b"\xcb\xff")


def encode_frame(obj: dict[str, Any]) -> bytes:
    """Header + MessagePack payload; str as str, bytes as bin, NaN/Inf as nil."""
    payload = msgpack.packb(obj, use_bin_type=True)
    if _NON_FINITE_MARKERS[0] in payload or _NON_FINITE_MARKERS[1] in payload:
        payload = msgpack.packb(sanitize(obj), use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Decode one frame body; it must be exactly one map with string keys."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(
            ErrorCode.MALFORMED_FRAME,
            f"frame is not valid MessagePack: {type(exc).__name__}: {exc}",
        ) from None
    if not isinstance(obj, dict):
        raise FrameError(
            ErrorCode.INVALID_REQUEST,
            f"frame must be a MessagePack map, got {type(obj).__name__}",
        )
    for key in obj:
        if not isinstance(key, str):
            raise FrameError(
                ErrorCode.INVALID_REQUEST,
                f"map keys must be strings, got {type(key).__name__} key {key!r:.40}",
            )
    return obj


class FrameReader:
    """Blocking reader of frames from a file descriptor.

    `read()` returns one payload (bytes), None on a clean EOF between frames,
    or raises FrameError: `frame_too_large` (stream still in sync) or
    `truncated_frame` (EOF inside a frame; fatal).
    """

    def __init__(self, fd: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.fd = fd
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def _fill(self, need: int) -> bool:
        """Read until the buffer holds `need` bytes; False on EOF first."""
        while len(self._buf) < need:
            chunk = os.read(self.fd, max(_READ_CHUNK, need - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def _skip(self, n: int) -> int:
        """Discard n bytes without ever holding them all; returns bytes skipped."""
        skipped = min(n, len(self._buf))
        del self._buf[:skipped]
        while skipped < n:
            chunk = os.read(self.fd, min(_READ_CHUNK, n - skipped))
            if not chunk:
                break
            skipped += len(chunk)
        return skipped

    def payloads(self, on_error: Callable[[FrameError], None]) -> Iterator[bytes]:
        """Every payload until EOF, a fatal FrameError or a dead descriptor.

        A recoverable FrameError (an oversized frame, skipped) goes to
        `on_error` and reading goes on; a fatal one goes there too, then ends.
        """
        while True:
            try:
                payload = self.read()
            except FrameError as exc:
                on_error(exc)
                if exc.fatal:
                    return
                continue
            except OSError:
                return
            if payload is None:
                return
            yield payload

    def read(self) -> bytes | None:
        if not self._fill(HEADER.size):
            if self._buf:
                got = len(self._buf)
                self._buf.clear()
                raise FrameError(
                    ErrorCode.TRUNCATED_FRAME,
                    f"stream ended inside a frame header ({got} of 4 bytes)",
                    fatal=True,
                )
            return None
        (length,) = HEADER.unpack_from(self._buf)
        if length > self.max_frame_bytes:
            del self._buf[: HEADER.size]
            skipped = self._skip(length)
            if skipped < length:
                raise FrameError(
                    ErrorCode.TRUNCATED_FRAME,
                    f"stream ended inside an oversized frame ({skipped} of {length} bytes)",
                    fatal=True,
                )
            raise FrameError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes} bytes",
                details={"length": length, "max_frame_bytes": self.max_frame_bytes},
            )
        if not self._fill(HEADER.size + length):
            got = len(self._buf) - HEADER.size
            self._buf.clear()
            raise FrameError(
                ErrorCode.TRUNCATED_FRAME,
                f"stream ended inside a frame ({got} of {length} bytes)",
                fatal=True,
            )
        payload = bytes(self._buf[HEADER.size : HEADER.size + length])
        del self._buf[: HEADER.size + length]
        return payload


class FrameWriter:
    """Writes whole frames to a file descriptor, one thread at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def write(self, obj: dict[str, Any]) -> None:
        data = encode_frame(obj)
        with self.lock:
            self.write_raw_locked(data)

    def write_raw_locked(self, data: bytes) -> None:
        """Write bytes fully; caller holds `self.lock`."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
