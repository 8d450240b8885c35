"""Runs extension commands in child processes and turns their output into one reply."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uff_port.protocol.errors import ErrorCode
from uff_port.server.children import Child
from uff_port.server.outbox import EventStream


class TaskRunner:
    def __init__(self, events: EventStream, runs_root: Path, python: str | None = None) -> None:
        self._events = events
        self._runs_root = runs_root
        self._python = python or sys.executable
        self._children: set[Child] = set()
        self._lock = threading.Lock()

    def start(
        self, target: str, args: dict[str, Any], on_done: Callable[[dict[str, Any] | None, dict[str, Any] | None], None]
    ) -> None:
        """Run `target(args)`; `on_done(result, error)` is called exactly once."""
        child = Child(
            [self._python, "-m", "uff_port.server.extension_child"],
            extra_argv=[target],
            name=f"task[{target}]",
        )
        with self._lock:
            self._children.add(child)
        child.send({"args": args, "runs_root": str(self._runs_root)})
        threading.Thread(target=self._watch, args=(child, on_done), daemon=True).start()

    def _watch(self, child: Child, on_done: Callable[[dict[str, Any] | None, dict[str, Any] | None], None]) -> None:
        outcome: dict[str, Any] = {}

        def on_frame(frame: dict[str, Any]) -> None:
            if "event" in frame and isinstance(frame["event"], str):
                fields = {k: v for k, v in frame.items() if k not in ("event", "seq")}
                self._events.emit(frame["event"], **fields)
            elif "result" in frame or "error" in frame:
                outcome.update(frame)

        child.read_frames(on_frame)
        code = child.wait(timeout=10)
        child.signal_group(9)
        with self._lock:
            self._children.discard(child)
        if "result" in outcome:
            on_done(outcome["result"], None)
        elif "error" in outcome and isinstance(outcome["error"], dict):
            on_done(None, outcome["error"])
        else:
            tail = [line for line in child.stderr_tail if line.strip()]
            on_done(
                None,
                {
                    "code": ErrorCode.INTERNAL,
                    "message": f"command process exited (status {code}) without a reply"
                    + (f": {tail[-1]}" if tail else ""),
                    "details": {"stderr_tail": tail[-10:]},
                },
            )

    def kill_all(self) -> None:
        with self._lock:
            children = list(self._children)
        for child in children:
            child.signal_group(9)
