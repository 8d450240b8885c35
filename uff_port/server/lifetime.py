"""Process lifetime: parent-death signals and process-group teardown.

The worker must never outlive the Elixir VM, and nothing it starts may outlive
the worker: a trainer left behind pins GPU memory until someone notices.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` when our parent dies; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


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


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
