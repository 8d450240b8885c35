"""GPU (NVML) and host (psutil) sampling for heartbeats and status.

Sampling never raises: no GPU, no driver or a broken NVML yields an empty
list, because a heartbeat must go out whatever the hardware does.
"""

from __future__ import annotations

from uff_port.telemetry.gpu import sample_gpus
from uff_port.telemetry.host import sample_host

__all__ = ["sample_gpus", "sample_host"]
