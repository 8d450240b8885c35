"""NVML sampling: index, name, utilisation, memory, temperature, power per GPU."""

from __future__ import annotations

import os
import threading
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {"init": None}  # None: not tried, False: unavailable, True: ready


def _nvml() -> Any | None:
    with _lock:
        if _state["init"] is None:
            if os.environ.get("UFF_PORT_DISABLE_NVML"):
                _state["init"] = False
                return None
            try:
                import pynvml  # from nvidia-ml-py

                pynvml.nvmlInit()
                _state["nvml"] = pynvml
                _state["init"] = True
            except Exception:
                # No driver, no library, no device: an empty list, never an error.
                _state["init"] = False
        return _state.get("nvml") if _state["init"] else None


def _visible(count: int) -> list[int]:
    """Physical indices the job may use: honour CUDA_VISIBLE_DEVICES when numeric."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip() == "":
        return list(range(count)) if env is None else []
    out = []
    for part in env.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            out.append(int(part))
    return out if out else list(range(count))


def _one(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    gpu: dict[str, Any] = {"index": index}
    name = nvml.nvmlDeviceGetName(handle)
    gpu["name"] = name.decode() if isinstance(name, bytes) else str(name)
    for key, fn in (
        ("util", lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        ("temperature", lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
        ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
    ):
        try:
            gpu[key] = fn()
        except Exception:
            gpu[key] = None
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpu["memory_used"] = int(mem.used)
        gpu["memory_total"] = int(mem.total)
    except Exception:
        gpu["memory_used"] = gpu["memory_total"] = None
    return gpu


def sample_gpus() -> list[dict[str, Any]]:
    """One dict per visible GPU; [] without GPU or driver."""
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        count = nvml.nvmlDeviceGetCount()
        return [_one(nvml, i) for i in _visible(count)]
    except Exception:
        return []
