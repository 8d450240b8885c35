"""Worker command `eval` (docs/internals.md section 2): the CLI's evaluation, for the Elixir side.

Runs in a short-lived child of the worker. Every path a client sends is
confined to the run root. Events: `eval_progress` (`phase` generate/execute,
`done`, `total`; at most every `progress_every_seconds`, and at the end of a
phase) and `eval_result` (the summary, also the reply).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from uff_port.fsutil import confine
from uff_port.protocol.errors import CommandError, ErrorCode


class TaskContext(Protocol):
    runs_root: Path

    def emit(self, event: str, **fields: Any) -> None: ...


def _bad(field: str, expected: str, got: Any) -> CommandError:
    return CommandError(ErrorCode.INVALID_ARGS, f"args.{field}: expected {expected}, got {got!r}"[:300])


def _path(ctx: TaskContext, args: dict[str, Any], key: str) -> Path | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(key, "a non-empty string path", value)
    try:
        return confine(ctx.runs_root, value)
    except ValueError as exc:
        raise CommandError(ErrorCode.INVALID_ARGS, f"args.{key}: {exc}") from None


def _num(args: dict[str, Any], key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    value = args.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok or not lo <= value <= hi:
        raise _bad(key, f"a{'n integer' if kind is int else ' number'} in [{lo:g}, {hi:g}]", value)
    return kind(value)


def summary(res: dict[str, Any], out: Path | None) -> dict[str, Any]:
    return {"suite": res["suite"], "suite_digest": res["suite_digest"], "tasks": res["tasks"],
            "samples": res["samples_total"], "metrics": res["metrics"], "by_manager": res["by_manager"],
            "by_stage": res["by_stage"], "scorers": res["scorers"], "sandbox": res["sandbox"],
            "results": str(out) if out else None}


def eval_command(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: `suite`; `samples` (a sample file) or `target` (run/model dir or builtin model);
    optional `n`, `k`, `temperature`, `top_p`, `max_new_tokens`, `batch_size`, `seed`, `limit`,
    `timeout`, `memory_mb`, `scorers` (built-in or installed names), `out`,
    `progress_every_seconds`."""
    from uff_port.eval import api
    from uff_port.eval.generate import GenConfig, TargetError
    from uff_port.eval.sandbox import Limits, MiB, Sandbox
    from uff_port.eval.scoring import ScorerError, load_scorer
    from uff_port.eval.suites import Suite, SuiteError, load_suite, suite_names

    name = args.get("suite")
    if not isinstance(name, str) or not name:
        raise _bad("suite", f"a shipped suite ({', '.join(suite_names())}) or a path", name)
    samples = _path(ctx, args, "samples")
    target = args.get("target")
    if target is not None and not (isinstance(target, str) and target.startswith("builtin:")):
        target = str(_path(ctx, args, "target"))
    if (samples is None) == (target is None):
        raise CommandError(ErrorCode.INVALID_ARGS, "args: give exactly one of samples and target")
    n = _num(args, "n", int, 1, 1, 1000)
    ks = args.get("k", sorted({1, n}))
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and not isinstance(k, bool)
                                                     and 1 <= k <= (n if target else 1000) for k in ks):
        raise _bad("k", f"a non-empty list of integers in [1, {n if target else 1000}]", ks)
    scorer_names = args.get("scorers", [])
    if not isinstance(scorer_names, list) or any(not isinstance(s, str) or ":" in s for s in scorer_names):
        # module:function would import client-chosen code into the worker's child
        raise _bad("scorers", "a list of built-in or installed scorer names", scorer_names)
    every = _num(args, "progress_every_seconds", float, 0.5, 0.0, 3600.0)
    try:
        suite = load_suite(name if name in suite_names() else str(_path(ctx, args, "suite")))
        if args.get("limit") is not None:
            suite = Suite(suite.name, suite.source, suite.tasks[: _num(args, "limit", int, 0, 1, 10**6)])
        gen = GenConfig(n=n, temperature=_num(args, "temperature", float, 0.0 if n == 1 else 0.8, 0.0, 10.0),
                        top_p=_num(args, "top_p", float, 0.95, 0.0, 1.0),
                        max_new_tokens=_num(args, "max_new_tokens", int, 256, 1, 8192),
                        batch_size=_num(args, "batch_size", int, 8, 1, 1024),
                        seed=_num(args, "seed", int, 0, 0, 2**31 - 1))
        limits = Limits(timeout_s=_num(args, "timeout", float, 10.0, 0.1, 3600.0),
                        memory_bytes=_num(args, "memory_mb", int, 4096, 64, 1 << 20) * MiB)
        scorers = [load_scorer(s) for s in scorer_names]
    except (SuiteError, ScorerError, ValueError) as exc:
        raise CommandError(ErrorCode.INVALID_ARGS, str(exc)) from None
    out = _path(ctx, args, "out") or (
        Path(target) / "eval" / f"{suite.name}.json" if target and Path(target).is_dir()
        else ctx.runs_root / "eval" / f"{suite.name}.json")
    last: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last.get(phase, 0.0) >= every:
            last[phase] = now
            ctx.emit("eval_progress", phase=phase, done=done, total=total, suite=suite.name)

    try:
        with Sandbox(limits) as sandbox:
            if samples is not None:
                res = api.score_file(suite, samples, sandbox, out, ks, scorers, progress)
            else:
                assert target is not None
                res = api.eval_target(target, suite, gen, sandbox, out, ks, scorers,
                                      str(args.get("device", "cpu")), None, progress)
    except TargetError as exc:
        raise CommandError(ErrorCode.NOT_FOUND, str(exc)) from None
    except SuiteError as exc:
        raise CommandError(ErrorCode.INVALID_ARGS, str(exc)) from None
    result = summary(res, out)
    ctx.emit("eval_result", **result)
    return result
