"""Process lifetime: parent-death signals and process-group teardown.

The worker must never outlive the Elixir VM, and nothing it starts may outlive
the worker: a trainer left behind pins GPU memory until someone notices.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from uff_port.procutil import group_alive, kill_group, set_parent_death_signal

__all__ = ["group_alive", "kill_group", "set_parent_death_signal", "watch_parent"]


def watch_parent(on_orphaned: Callable[[], None], interval: float = 0.5) -> threading.Thread:
    """Backup for PDEATHSIG (which follows the parent *thread*): poll getppid.

    A change of parent means ours died and we were re-parented to init or a
    subreaper.
    """
    original = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != original:
                on_orphaned()
                return

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread
