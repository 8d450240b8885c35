"""Child side of an extension command: `python -m uff_port.server.extension_child --control-fd N TARGET`.

Reads one frame `{"args": {...}, "runs_root": str}`, runs `module:function`,
sends events as they happen and then exactly one `{"result": ...}` or
`{"error": {...}}` frame. Every exception becomes an error frame with a code;
nothing is raised across the boundary.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uff_port.protocol.errors import CommandError, ErrorCode
from uff_port.protocol.framing import FrameReader, FrameWriter, decode_payload
from uff_port.server.lifetime import set_parent_death_signal


@dataclass
class TaskContext:
    """What a handler may use: where runs live, and a way to send events."""

    runs_root: Path
    writer: FrameWriter | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, event: str, /, **fields: Any) -> None:
        frame = {"event": event, "ts": time.time(), **fields}
        if self.writer is None:
            self.events.append(frame)
        else:
            self.writer.write(frame)


def resolve(target: str) -> Any:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uff_port.server.extension_child")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("target")
    opts = parser.parse_args(argv)
    set_parent_death_signal(signal.SIGTERM)
    reader = FrameReader(opts.control_fd)
    writer = FrameWriter(opts.control_fd)
    payload = reader.read()
    if payload is None:
        return 1
    request = decode_payload(payload)
    ctx = TaskContext(runs_root=Path(request.get("runs_root") or "runs"), writer=writer)
    try:
        result = resolve(opts.target)(request.get("args") or {}, ctx)
        writer.write({"result": result if isinstance(result, dict) else {"value": result}})
    except CommandError as exc:
        writer.write({"error": exc.to_wire()})
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        writer.write(
            {
                "error": {
                    "code": ErrorCode.INTERNAL,
                    "message": f"{type(exc).__name__}: {exc}",
                    "details": {"traceback": traceback.format_exc(limit=20)},
                }
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
