"""The control words: what the worker asks of a training recipe, and how it is answered.

Between steps a recipe polls the channel (`Control.poll`): `status` is answered
at once, `checkpoint` and `stop` are queued until the step boundary, and EOF or
a signal (the worker is gone, or the machine is going) becomes a stop with a
checkpoint. Every rank polls; the ranks then agree on the strongest word
(`dist.agree_max`), so the words are ordered by urgency. Any recipe (SFT, RL)
answers the same words the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from uff_port.protocol.errors import ErrorCode
from uff_port.training.channel import EOF, SIGNAL, Command, Inbox
from uff_port.training.reporting import Reporter

# Agreed on by all ranks at a step boundary: max wins.
GO: Final = 0
CKPT: Final = 1
STOP_NOSAVE: Final = 2
STOP: Final = 3
DISK_FULL: Final = 4


class StopTraining(Exception):
    """Leave the loop: `code` is the exit code, after any checkpoint was made durable."""

    def __init__(self, code: int) -> None:
        self.code = code


class Control:
    def __init__(self, inbox: Inbox, reporter: Reporter, emit: Callable[..., None]) -> None:
        self.inbox = inbox
        self.report = reporter
        self.emit = emit

    def poll(self, pending: list[Command], status: Callable[[], dict[str, Any]]) -> int:
        """Answer status at once; return the strongest control word asked for."""
        want = CKPT if pending else GO  # a checkpoint asked for mid-step is still owed
        for c in self.inbox.poll():
            if c.cmd == "status":
                self.report.reply(c.id, status())
            elif c.cmd == "checkpoint":
                pending.append(c)
                want = max(want, CKPT)
            elif c.cmd == "stop":
                pending.append(c)
                want = max(want, STOP if c.args.get("checkpoint", True) else STOP_NOSAVE)
            elif c.cmd in (EOF, SIGNAL):
                why = "channel closed" if c.cmd == EOF else f"signal {c.args.get('signum')}"
                self.emit("log", level="warning", message=f"{why}: checkpointing and stopping")
                want = max(want, STOP)
            else:
                self.report.reply(c.id, error={"code": ErrorCode.UNKNOWN_COMMAND, "message": f"trainer does not know {c.cmd!r}"})
        return want

    def answer(self, pending: list[Command], step: int, path: str | None) -> None:
        """Reply to the queued `checkpoint` and `stop` commands once the boundary's work is done."""
        for c in pending:
            if c.cmd == "checkpoint":
                self.report.reply(c.id, {"step": step, "path": path})
            elif c.cmd == "stop":
                self.report.reply(c.id, {"step": step, "checkpoint": path})
        pending.clear()
