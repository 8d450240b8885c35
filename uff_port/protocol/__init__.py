"""Wire protocol: {packet, 4} framing and the v1 message schema.

Never imports torch (or anything heavy): the worker must start in well under a
second and the Elixir side's contract lives here.
"""

from __future__ import annotations

from uff_port.protocol.errors import CommandError, ErrorCode
from uff_port.protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameError,
    FrameReader,
    FrameWriter,
    decode_payload,
    encode_frame,
    sanitize,
)
from uff_port.protocol.messages import failed_fields, finished_fields

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "CommandError",
    "ErrorCode",
    "FrameError",
    "FrameReader",
    "FrameWriter",
    "decode_payload",
    "encode_frame",
    "failed_fields",
    "finished_fields",
    "sanitize",
]
