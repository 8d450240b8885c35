"""uff-port: a fine-tuning worker driven by Elixir/OTP over a {packet, 4} Port."""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
