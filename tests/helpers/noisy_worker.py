"""The real worker, with threads that keep writing junk to fd 1 from Python, C and children.

If any of those bytes reached the Port, the client would see a broken frame.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from uff_port.server.worker import ServeOptions, Worker


def noise(stop_after: float) -> None:
    libc = ctypes.CDLL(None)
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        print("python print to stdout", flush=True)
        sys.stdout.write("sys.stdout.write\n")
        sys.stdout.flush()
        os.write(1, b"os.write(1)\n")
        libc.printf(b"C printf to stdout\n")
        libc.fflush(None)
        libc.write(1, b"C write(1)\n", 11)
        subprocess.run(["echo", "child process echo"], check=False)
        subprocess.run([sys.executable, "-c", "print('child python print')"], check=False)
        time.sleep(0.05)


class NoisyWorker(Worker):
    def attach(self, write_fd: int) -> None:
        # serve() has just claimed stdio: from here on fd 1 must be harmless.
        super().attach(write_fd)
        threading.Thread(target=noise, args=(3.0,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(NoisyWorker(ServeOptions(heartbeat_interval=0.1, runs_root=Path(sys.argv[1]))).serve())
