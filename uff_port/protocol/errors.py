"""Stable error codes of protocol v1 and the one exception that carries them.

Codes are part of the wire contract (docs/protocol.md lists each): clients
match on them, so they never change meaning.
"""

from __future__ import annotations

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
    UNSAFE_PATH: Final = "unsafe_path"  # a symlink (or non-file) in a run directory that leads out of it
    # Registry and releases (docs/registry.md).
    INVALID_MANIFEST: Final = "invalid_manifest"
    VERIFY_FAILED: Final = "verify_failed"
    GATE_FAILED: Final = "gate_failed"
    ALIAS_CONFLICT: Final = "alias_conflict"
    INCONSISTENT_RELEASE: Final = "inconsistent_release"
    INVALID_GATES: Final = "invalid_gates"
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
