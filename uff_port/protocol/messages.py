"""Protocol v1 messages: request parsing, argument checks, reply shapes.

Everything a client can get wrong is caught here and turned into a
CommandError whose message names the field and what was expected, so the
dispatcher can always answer, and answer precisely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from uff_port.protocol.errors import CommandError, ErrorCode

_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    dict: "map",
    list: "array",
    bytes: "binary",
    type(None): "nil",
}


def wire_type(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Arg:
    """One argument of a command: accepted Python types and whether required."""

    types: tuple[type, ...]
    required: bool = False
    doc: str = ""

    def expected(self) -> str:
        if object in self.types:
            return "any value"
        return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in self.types)

    def accepts(self, value: Any) -> bool:
        if object in self.types:
            return True
        # bool is an int in Python, never on the wire: an integer field refuses true/false.
        if isinstance(value, bool) and bool not in self.types:
            return False
        if isinstance(value, int) and not isinstance(value, bool) and float in self.types:
            return True
        return isinstance(value, self.types)


@dataclass(frozen=True)
class Request:
    id: int
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


def request_id_of(frame: Any) -> int | None:
    """The request id if one can be read, for error replies to broken requests."""
    if isinstance(frame, dict):
        rid = frame.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            return rid
    return None


def parse_request(frame: dict[str, Any]) -> Request:
    rid, cmd, args = frame.get("id"), frame.get("cmd"), frame.get("args")
    # Fast path for the well-formed request; everything else gets the careful checks below.
    if type(rid) is int and type(cmd) is str and len(frame) == 2 + ("args" in frame):
        if args is None:
            return Request(rid, cmd, {})
        if type(args) is dict:
            return Request(rid, cmd, args)
    return _parse_request_slow(frame)


def _parse_request_slow(frame: dict[str, Any]) -> Request:
    if "event" in frame and "cmd" not in frame:
        raise CommandError(ErrorCode.INVALID_REQUEST, "events are sent by the worker, not to it")
    rid = frame.get("id")
    if rid is None:
        raise CommandError(ErrorCode.INVALID_REQUEST, "request has no 'id' (expected an integer)")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise CommandError(ErrorCode.INVALID_REQUEST, f"'id' must be an integer, got {wire_type(rid)}")
    cmd = frame.get("cmd")
    if cmd is None:
        raise CommandError(ErrorCode.INVALID_REQUEST, "request has no 'cmd' (expected a string)")
    if not isinstance(cmd, str):
        raise CommandError(ErrorCode.INVALID_REQUEST, f"'cmd' must be a string, got {wire_type(cmd)}")
    args = frame.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError(ErrorCode.INVALID_REQUEST, f"'args' must be a map, got {wire_type(args)}")
    unknown = sorted(set(frame) - {"id", "cmd", "args"})
    if unknown:
        raise CommandError(
            ErrorCode.INVALID_REQUEST,
            f"unknown request field(s) {unknown}; a request has only 'id', 'cmd' and 'args'",
        )
    return Request(id=rid, cmd=cmd, args=args)


def check_args(cmd: str, args: dict[str, Any], spec: dict[str, Arg]) -> dict[str, Any]:
    """Check `args` against `spec`; raise invalid_args naming every bad field."""
    if not args and not any(arg.required for arg in spec.values()):
        return args
    problems: list[str] = []
    fields: list[dict[str, Any]] = []
    for name in sorted(set(args) - set(spec)):
        allowed = ", ".join(sorted(spec)) or "none"
        problems.append(f"args.{name}: unknown argument for '{cmd}' (allowed: {allowed})")
        fields.append({"field": f"args.{name}", "expected": "absent", "got": wire_type(args[name])})
    for name, arg in spec.items():
        if name not in args or args[name] is None:
            if arg.required:
                problems.append(f"args.{name}: required ({arg.expected()})")
                fields.append({"field": f"args.{name}", "expected": arg.expected(), "got": "missing"})
            continue
        if not arg.accepts(args[name]):
            got = wire_type(args[name])
            problems.append(f"args.{name}: expected {arg.expected()}, got {got}")
            fields.append({"field": f"args.{name}", "expected": arg.expected(), "got": got})
    if problems:
        raise CommandError(ErrorCode.INVALID_ARGS, "; ".join(problems), {"fields": fields})
    return {k: v for k, v in args.items() if v is not None}


def ok_reply(rid: int, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def error_reply(rid: int | None, code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message, "details": details}}


# The two terminal events of a job (docs/protocol.md, "Events"). Every plane that
# ends a job (the trainer, the worker when a trainer dies, the cloud runner)
# builds their fields here, so the wire shape has one definition.
FAILED_OPTIONAL: Final = frozenset(
    {"step", "details", "job_id", "exit_status", "stderr_tail", "last_checkpoint", "source"}
)
FINISHED_OPTIONAL: Final = frozenset(
    {"max_steps", "loss", "eval_loss", "final", "last_checkpoint", "tokens_seen", "job_id", "run_dir", "source"}
)


def _check_optional(event: str, given: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise TypeError(f"{event} event: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def failed_fields(code: str, message: str, *, resumable: bool, **optional: Any) -> dict[str, Any]:
    """Fields of a `failed` event: `code`, `message`, `resumable` (a checkpoint exists to
    resume from, and resuming can help), then whichever of FAILED_OPTIONAL the sender knows."""
    _check_optional("failed", optional, FAILED_OPTIONAL)
    return {"code": str(code), "message": message, "resumable": bool(resumable), **optional}


def finished_fields(*, step: int | None, **optional: Any) -> dict[str, Any]:
    """Fields of a `finished` event: `step`, then whichever of FINISHED_OPTIONAL the sender knows
    (the trainer sends all of max_steps, loss, eval_loss, final, last_checkpoint, tokens_seen)."""
    _check_optional("finished", optional, FINISHED_OPTIONAL)
    return {"step": step, **optional}
