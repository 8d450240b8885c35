"""What every cloud backend offers, and the two kinds of provider error.

`ProviderUnavailable` (network down, throttled, 5xx) means *we do not know*:
the job may well be running, so the caller backs off and asks again, and never
resubmits. `ProviderError` means the provider answered and refused.
`ProviderNotAvailable` means this installation lacks the provider's client
package: nothing was asked, and no retry can help until it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

REMOTE_STATES: Final = ("queued", "running", "completed", "interrupted", "failed", "stopped")


class ProviderUnavailable(Exception):
    """The provider could not be reached or answered with a transient error."""


class ProviderError(Exception):
    """The provider answered and refused (bad credentials, invalid request)."""


class ProviderNotAvailable(ProviderError):
    """The provider's client package (an optional extra) is not installed here."""


@dataclass(frozen=True)
class RemoteStatus:
    state: str
    """One of REMOTE_STATES."""
    detail: str = ""
    """The provider's own words (secondary status, failure message)."""
    billed_seconds: float | None = None
    started_ts: float | None = None
    ended_ts: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ("completed", "interrupted", "failed", "stopped")


@dataclass
class SessionSpec:
    """One remote session of a run."""

    run_id: str
    name: str
    """Deterministic, provider-safe: the idempotency key of the submission."""
    index: int
    bundle_dir: Path
    budget_seconds: float
    margin_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def find(self, spec: SessionSpec) -> str | None:
        """The remote ref of `spec` if the provider already knows it (crash recovery)."""

    def submit(self, spec: SessionSpec) -> str:
        """Start the session; returns its remote ref."""

    def status(self, ref: str) -> RemoteStatus: ...

    def stop(self, ref: str) -> None: ...

    def pull(self, ref: str, dest: Path) -> None:
        """Download the session's output tree into `dest` (created, initially empty)."""
