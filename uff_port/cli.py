"""`uff-port` command line: one subcommand per plane, each registered by its module.

Each plane's `cli.py` exposes `register(subparsers)`; it must import nothing
heavy at module level (torch is imported inside the command that needs it) so
that `uff-port serve` starts in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Final

from uff_port import PROTOCOL_VERSION, __version__

# Order is the order of `uff-port --help`.
COMMAND_MODULES: Final = (
    "uff_port.server.cli",  # serve, client
    "uff_port.training.cli",  # train, resume, status
    "uff_port.planner.cli",  # plan
    "uff_port.cloud.cli",  # plan-week, cloud
    "uff_port.registry.cli",  # register, promote, rollback, federate, ...
    "uff_port.eval.cli",  # eval, compare
    "uff_port.eval.adapter_cli",  # generate, chat, merge
    "uff_port.campaign.cli",  # campaign status
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uff-port",
        description=(
            "Fine-tuning worker for Elixir/OTP. `serve` is the Port worker; the other "
            "subcommands run the same machinery from a terminal."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"uff-port {__version__} (protocol {PROTOCOL_VERSION})"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # plane not built into this installation
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
