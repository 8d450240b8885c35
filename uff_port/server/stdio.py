"""Claim the Port's pipes for frames only.

The Port reads fd 1 as a frame stream, so one stray byte (a `print`, a C
library's banner, a child's output) would desynchronise it for good. At start
we move the real stdout and stdin to private close-on-exec descriptors, point
fd 1 at stderr and fd 0 at /dev/null. Children then inherit harmless fds and
cannot read our requests or write into our frames.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class PortFds:
    read_fd: int
    write_fd: int


def claim_stdio() -> PortFds:
    # Order matters: duplicate the originals before anything overwrites fd 0/1.
    write_fd = os.dup(1)
    read_fd = os.dup(0)
    os.set_inheritable(write_fd, False)
    os.set_inheritable(read_fd, False)
    sys.stdout.flush()
    os.dup2(2, 1)  # every later write to fd 1 (Python, C, children) lands on stderr
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Python's sys.stdout still wraps fd 1, which is now stderr: prints are safe.
    return PortFds(read_fd=read_fd, write_fd=write_fd)
