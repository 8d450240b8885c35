"""`uff-port client`: drive a worker from the terminal."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

from uff_port.client import WorkerClient, WorkerError
from uff_port.core.config_io import ConfigLimitError, parse_yaml_value


def parse_request_line(line: str) -> tuple[str, dict[str, Any]]:
    """'train config_path=tiny overrides={training.max_steps: 5}' -> ('train', {...})."""
    parts = shlex.split(line)
    if not parts:
        raise ValueError("empty request")
    args: dict[str, Any] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {part!r}")
        try:
            args[key] = parse_yaml_value(value, key) if value else ""
        except ConfigLimitError as exc:
            raise ValueError(exc.problem) from None
    return parts[0], args


def _show(frame: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(frame, default=repr), flush=True)
        return
    if "event" in frame:
        name = frame["event"]
        rest = {k: v for k, v in frame.items() if k not in ("event", "seq", "ts", "gpus", "host")}
        print(f"  [{frame.get('seq')}] {name}: {json.dumps(rest, default=repr)}", flush=True)
    else:
        print(json.dumps(frame, indent=2, default=repr), flush=True)


def _job_ended(job_id: str) -> Callable[[dict[str, Any]], bool]:
    """The worker's return to idle after `job_id`: it carries the outcome, whatever it was."""
    return lambda e: e.get("event") == "state" and e.get("job_id") == job_id and "outcome" in e


def run_client(args: argparse.Namespace) -> int:
    """Send the requests in order; exit 1 if any was refused, timed out or (waited for) did not finish.

    `--wait-finished` waits only for a job a `train`/`resume` started: after a
    refusal there is nothing to wait for, so it returns at once.
    """
    client = WorkerClient(runs_root=args.runs_root, heartbeat_interval=args.heartbeat_interval)
    if not args.quiet:
        _show(client.hello, args.json)
        client.on_event(lambda e: _show(e, args.json))
    failures = 0
    job_id: str | None = None
    lines = args.requests or (line.strip() for line in sys.stdin)
    for line in lines:
        if not line:
            continue
        try:
            cmd, req_args = parse_request_line(line)
        except ValueError as exc:
            print(f"bad request {line!r}: {exc}", file=sys.stderr)
            failures += 1
            continue
        try:
            reply = client.call(cmd, req_args or None, timeout=args.timeout)
        except (TimeoutError, EOFError) as exc:
            print(f"{cmd}: {exc}", file=sys.stderr)
            failures += 1
            continue
        _show(reply, args.json)
        if not reply.get("ok"):
            failures += 1
        elif cmd in ("train", "resume"):
            job_id = (reply.get("result") or {}).get("job_id")
    if args.wait_finished:
        if job_id is None:
            print("--wait-finished: no job was started, nothing to wait for", file=sys.stderr)
        else:
            try:
                ended = client.wait_event(_job_ended(job_id), timeout=24 * 3600)
                if ended.get("outcome") != "finished":
                    print(f"job {job_id} ended {ended.get('outcome')} (exit status {ended.get('exit_status')})",
                          file=sys.stderr)
                    failures += 1
            except TimeoutError as exc:
                print(f"--wait-finished: {exc}", file=sys.stderr)
                failures += 1
    try:
        client.request("shutdown", timeout=None if args.timeout is None else max(args.timeout, 120))
    except (WorkerError, TimeoutError, EOFError):
        pass
    code = client.wait(150)
    return 1 if failures else code
