"""Host figures: CPU load, memory available, RSS of the worker and its children."""

from __future__ import annotations

from typing import Any

import psutil

_self = psutil.Process()


def sample_host() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    rss = 0
    children_rss = 0
    try:
        rss = _self.memory_info().rss
        for child in _self.children(recursive=True):
            try:
                children_rss += child.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "load_avg_1m": psutil.getloadavg()[0],
        "memory_available": vm.available,
        "memory_total": vm.total,
        "rss": rss,
        "children_rss": children_rss,
    }
