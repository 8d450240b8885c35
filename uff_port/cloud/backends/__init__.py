"""Cloud backends by name; tests and the simulator register fakes here."""

from __future__ import annotations

from uff_port.cloud.backends.base import (
    Backend,
    ProviderError,
    ProviderNotAvailable,
    ProviderUnavailable,
    RemoteStatus,
    SessionSpec,
)

__all__ = [
    "Backend",
    "ProviderError",
    "ProviderNotAvailable",
    "ProviderUnavailable",
    "RemoteStatus",
    "SessionSpec",
]
