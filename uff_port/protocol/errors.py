"""Stable error codes of protocol v1 and the one exception that carries them.

Codes are part of the wire contract (docs/protocol.md lists each): clients
match on them, so they never change meaning.
"""

from __future__ import annotations

import errno
from typing import Any, Final


class ErrorCode:
    """Every `error.code` the worker can send. Strings, never renumbered."""

    FRAME_TOO_LARGE: Final = "frame_too_large"
    TRUNCATED_FRAME: Final = "truncated_frame"
    MALFORMED_FRAME: Final = "malformed_frame"
    INVALID_REQUEST: Final = "invalid_request"
    UNKNOWN_COMMAND: Final = "unknown_command"
    INVALID_ARGS: Final = "invalid_args"
    INVALID_CONFIG: Final = "invalid_config"
    NOT_AVAILABLE: Final = "not_available"
    BUSY: Final = "busy"
    NO_JOB: Final = "no_job"
    NOT_FOUND: Final = "not_found"
    CHECKPOINT_FAILED: Final = "checkpoint_failed"
    CORRUPT_CHECKPOINT: Final = "corrupt_checkpoint"
    TRAINER_FAILED: Final = "trainer_failed"
    TIMEOUT: Final = "timeout"
    SHUTTING_DOWN: Final = "shutting_down"
    WONT_FIT: Final = "wont_fit"
    DISK_FULL: Final = "disk_full"
    NON_FINITE: Final = "non_finite"
    UNSAFE_PATH: Final = "unsafe_path"  # a symlink (or non-file) in a run directory that leads out of it
    # Sent only as `failed.code` by the trainer (docs/protocol.md section 6).
    MODEL_NOT_FOUND: Final = "model_not_found"
    CHECKPOINT_MISMATCH: Final = "checkpoint_mismatch"
    OUT_OF_MEMORY: Final = "out_of_memory"
    TOO_MANY_BAD_LINES: Final = "too_many_bad_lines"
    NO_DATA: Final = "no_data"
    DATA_NOT_FOUND: Final = "data_not_found"
    DATA_CURSOR_MISMATCH: Final = "data_cursor_mismatch"
    # Registry and releases (docs/registry.md).
    INVALID_MANIFEST: Final = "invalid_manifest"
    VERIFY_FAILED: Final = "verify_failed"
    GATE_FAILED: Final = "gate_failed"
    ALIAS_CONFLICT: Final = "alias_conflict"
    INCONSISTENT_RELEASE: Final = "inconsistent_release"
    INVALID_GATES: Final = "invalid_gates"
    # Deploy, watch, publish (docs/registry.md).
    RELEASE_HELD: Final = "release_held"
    HUB_FAILED: Final = "hub_failed"
    RELOAD_FAILED: Final = "reload_failed"
    INVALID_SLO: Final = "invalid_slo"
    INTERNAL: Final = "internal"


class CommandError(Exception):
    """An error that becomes `{"ok": false, "error": {...}}` on the wire.

    Raise it from any command handler; the dispatcher turns it into exactly one
    error reply and the worker carries on.
    """

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"CommandError({self.code!r}, {self.message!r})"


def disk_full_error(exc: OSError, doing: str) -> CommandError | None:
    """`disk_full` for ENOSPC/EDQUOT (what the user can fix), None for any other OSError."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return CommandError(
        ErrorCode.DISK_FULL,
        f"{doing}: no space left on the disk{where}; free some space and send the request again",
        {"errno": exc.errno, "path": exc.filename},
    )
