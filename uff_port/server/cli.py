"""`uff-port serve` (the Port worker) and `uff-port client` (drive one from a terminal)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the Port worker ({packet,4} MessagePack on stdin/stdout)",
        description=(
            "Run the Port worker: reads 4-byte big-endian length-prefixed MessagePack requests on "
            "stdin and writes replies and events on stdout (and nothing else: all logs go to stderr). "
            "See docs/protocol.md. Exits 0 after `shutdown` or EOF with nothing lost, 75 when it "
            "stopped a job early with a durable checkpoint, anything else on a crash."
        ),
    )
    serve.add_argument("--heartbeat-interval", type=_positive_float, default=2.0, metavar="SECONDS",
                       help="seconds between heartbeat events, idle or busy (default 2)")
    serve.add_argument("--max-frame-bytes", type=_positive_int, default=64 * 1024 * 1024, metavar="N",
                       help="refuse frames larger than this without reading them into memory (default 64 MiB)")
    serve.add_argument("--runs-root", type=Path, default=Path("runs"), metavar="DIR",
                       help="every run directory must lie under this directory (default ./runs)")
    serve.add_argument("--grace-seconds", type=_positive_float, default=100.0, metavar="S",
                       help="upper bound for a job's final checkpoint on stop/EOF/SIGTERM (default 100)")
    serve.add_argument("--progress-rate", type=_positive_float, default=20.0, metavar="PER_S",
                       help="at most this many progress events per second reach the Port (default 20)")
    serve.set_defaults(func=_serve)

    client = sub.add_parser(
        "client",
        help="spawn a worker and drive it from the terminal (test harness)",
        description=(
            "Spawn `uff-port serve` as a child and send it requests. Each REQUEST is `cmd` or "
            "`cmd key=value ...` (values parsed as YAML: numbers, true/false, maps). Without "
            "requests, reads them line by line from stdin. Events are printed as they arrive "
            "unless --quiet. Example: uff-port client 'train config_path=tiny' status --wait-finished"
        ),
    )
    client.add_argument("requests", nargs="*", metavar="REQUEST", help="e.g. ping, status, 'train config_path=tiny'")
    client.add_argument("--runs-root", type=Path, default=Path("runs"), metavar="DIR")
    client.add_argument("--heartbeat-interval", type=_positive_float, default=2.0, metavar="SECONDS")
    client.add_argument("--timeout", type=_positive_float, default=None, metavar="S", help="per-request timeout (default: the deadline the worker announces for the command in hello)")
    client.add_argument("--wait-finished", action="store_true",
                        help="after the requests, wait until the job they started ends; exit 1 unless it finished")
    client.add_argument("--quiet", action="store_true", help="print replies only, not events")
    client.add_argument("--json", action="store_true", help="print frames as JSON lines")
    client.set_defaults(func=_client)


def _serve(args: argparse.Namespace) -> int:
    from uff_port.server.worker import ServeOptions, run_worker

    opts = ServeOptions(
        max_frame_bytes=args.max_frame_bytes,
        heartbeat_interval=args.heartbeat_interval,
        runs_root=args.runs_root,
        grace_seconds=args.grace_seconds,
        progress_per_s=args.progress_rate,
    )
    return run_worker(opts)


def _client(args: argparse.Namespace) -> int:
    from uff_port.client_cli import run_client

    return run_client(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
