"""Process-lifetime primitives shared by every plane: parent-death signals, process groups.

The worker, the trainer, the torchrun launcher and helper processes all need
the same two guarantees: hear of a dead parent, and take everything they
started down with them. One implementation, so they cannot drift apart.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
from typing import Final

_PR_SET_PDEATHSIG: Final = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` when our parent dies; False where unsupported.

    Safe to call between fork and exec (as a Popen `preexec_fn`): it only calls prctl.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class SignalSafeEvent:
    """An Event whose `set` may be called from a signal handler.

    `threading.Event.set` takes a lock; a handler that runs while its own
    thread holds that lock (a second SIGTERM arriving inside the first
    handler) deadlocks the process for good: an orphan that never exits.
    `queue.SimpleQueue.put` is reentrant, so `set` here never blocks.
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._set = False

    def set(self) -> None:
        self._set = True
        self._q.put(None)

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                return

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (at once if already set), False after `timeout`."""
        if self._set:
            return True
        try:
            self._q.get(timeout=timeout)
        except queue.Empty:
            return self._set
        self._q.put(None)  # leave the wake-up for other waiters
        return True


STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that mean "checkpoint and exit": SIGHUP is an SSH session or terminal that went away."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """STOP_SIGNALS less SIGHUP when it is ignored on entry (`nohup`): such a run must keep going."""
    return tuple(s for s in STOP_SIGNALS if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN)


def detach_from_dead_terminal() -> None:
    """After SIGHUP: point stdout/stderr at /dev/null if they are a terminal (now hung up).

    A write to a hung-up terminal fails with EIO, and a progress bar or a warning
    printed on the way to the checkpoint must not turn a clean stop into a crash.
    """
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
