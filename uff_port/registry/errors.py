"""Error codes of the registry plane (names for rows of `ErrorCode`) and the one exception that carries them.

The codes travel in `error.code` of worker replies (via CommandError) and are
the CLI's exit messages; clients match on them, so they never change meaning.
"""

from __future__ import annotations

from typing import Any, Final

from uff_port.protocol.errors import CommandError, ErrorCode

INVALID_MANIFEST: Final = ErrorCode.INVALID_MANIFEST
"""A manifest failed the schema; `details.problems` lists 'field: message' strings."""
VERIFY_FAILED: Final = ErrorCode.VERIFY_FAILED
"""Stored files differ from the manifest (missing, extra, wrong size or sha256)."""
GATE_FAILED: Final = ErrorCode.GATE_FAILED
"""A promotion or release was refused by one or more gates; `details.gates` has them all."""
ALIAS_CONFLICT: Final = ErrorCode.ALIAS_CONFLICT
"""Compare-and-swap lost: the alias no longer points where the caller expected."""
INCONSISTENT_RELEASE: Final = ErrorCode.INCONSISTENT_RELEASE
"""Federated manifests disagree (base model, tokenizer, interface or a role's id)."""
NOT_FOUND: Final = ErrorCode.NOT_FOUND
INVALID_ARGS: Final = ErrorCode.INVALID_ARGS
INVALID_GATES: Final = ErrorCode.INVALID_GATES
"""The gates YAML failed its schema."""
NON_FINITE: Final = ErrorCode.NON_FINITE
"""The artifact's weights hold NaN or Inf (a diverged run); `details.tensors` names them."""
RELEASE_HELD: Final = ErrorCode.RELEASE_HELD
"""`deploy`: the artifact was rolled back after an SLO breach and stays out until `--unhold`."""
HUB_FAILED: Final = ErrorCode.HUB_FAILED
"""The Hugging Face Hub refused or failed a call (repo, revision, auth); `details.call` names it."""
RELOAD_FAILED: Final = ErrorCode.RELOAD_FAILED
"""The serving directory switched but the reload hook (command or vLLM endpoint) failed."""
INVALID_SLO: Final = ErrorCode.INVALID_SLO
"""The SLO YAML of `watch` failed its schema."""
UNSAFE_PATH: Final = ErrorCode.UNSAFE_PATH
"""An artifact or run directory holds a symlink (or non-file): never followed, never copied."""

EXIT_CODES: Final = {
    INVALID_ARGS: 2,
    INVALID_MANIFEST: 3,
    INVALID_GATES: 3,
    NOT_FOUND: 4,
    VERIFY_FAILED: 5,
    GATE_FAILED: 6,
    ALIAS_CONFLICT: 7,
    INCONSISTENT_RELEASE: 8,
    NON_FINITE: 9,
    INVALID_SLO: 3,
    RELEASE_HELD: 20,
    HUB_FAILED: 21,
    RELOAD_FAILED: 22,
    UNSAFE_PATH: 10,
}


class RegistryError(CommandError):
    """A registry failure with a stable code; a CommandError so the worker sends it as is."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(code, message, details)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.code, 1)
