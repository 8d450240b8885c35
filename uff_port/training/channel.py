"""The trainer's end of the worker channel: a reader thread plus signal hooks.

Commands, EOF and signals all arrive in one queue, so the training loop has a
single place to look between micro-steps and never blocks on the channel.
"""

from __future__ import annotations

import queue
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from uff_port.protocol import FrameError, FrameReader, decode_payload

EOF: Final = "eof"
SIGNAL: Final = "signal"


@dataclass
class Command:
    cmd: str
    id: Any = None
    args: dict[str, Any] = field(default_factory=dict)


class Inbox:
    """Thread-safe mailbox of Commands (channel requests, EOF, signals).

    A SimpleQueue, because its `put` is reentrant: a signal handler may run
    while the main thread is inside `put` (a second SIGTERM during the first
    handler), and a lock-taking Queue would deadlock the trainer forever.
    """

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.errors: list[str] = []

    def poll(self) -> list[Command]:
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out

    def put(self, cmd: Command) -> None:
        self.q.put(cmd)

    def start_reader(self, fd: int) -> threading.Thread:
        t = threading.Thread(target=self._read, args=(fd,), name="channel-reader", daemon=True)
        t.start()
        return t

    def _read(self, fd: int) -> None:
        reader = FrameReader(fd)
        for payload in reader.payloads(lambda exc: self.errors.append(exc.message)):
            try:
                msg = decode_payload(payload)
            except FrameError as exc:
                self.errors.append(exc.message)
                continue
            args = msg.get("args")
            self.put(Command(str(msg.get("cmd")), msg.get("id"), args if isinstance(args, dict) else {}))
        # The worker is gone (or the stream is unusable): same as being told to stop.
        self.put(Command(EOF))

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT/SIGHUP become a Command; the loop checkpoints and exits 75.

        SIGHUP (the SSH session or terminal is gone) is a stop like the others,
        unless it was ignored on entry (`nohup`).
        """
        from uff_port.procutil import detach_from_dead_terminal, stop_signals

        def handler(signum: int, _frame: Any) -> None:
            if signum == signal.SIGHUP:
                detach_from_dead_terminal()
            self.put(Command(SIGNAL, args={"signum": signum}))

        for sig in stop_signals():
            signal.signal(sig, handler)
