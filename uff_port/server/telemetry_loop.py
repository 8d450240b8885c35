"""A thread that samples GPU and host figures into a cache.

Heartbeats read the cache instead of calling NVML themselves: a driver call
that hangs then delays fresh figures, never the heartbeat.
"""

from __future__ import annotations

import threading
from typing import Any

from uff_port.telemetry import sample_gpus, sample_host


class TelemetryCache:
    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.gpus: list[dict[str, Any]] = []
        self.host: dict[str, Any] = {}
        self._stop = threading.Event()

    def sample_once(self) -> None:
        self.gpus = sample_gpus()
        self.host = sample_host()

    def start(self) -> None:
        self.sample_once()  # hello carries the device list
        threading.Thread(target=self._loop, name="telemetry", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample_once()
            except Exception:
                pass  # keep the last figures; a heartbeat must still go out

    def stop(self) -> None:
        self._stop.set()
