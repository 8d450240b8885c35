"""`uff-port campaign status DIR [--json] [--png FILE]`: read-only, from the journal."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    c = sub.add_parser("campaign", help="inspect a training campaign run by UffPort.Campaign (Elixir)")
    csub = c.add_subparsers(dest="campaign_command", metavar="ACTION")
    s = csub.add_parser("status", help="jobs, states, scores, verdicts and GPU-hours, from the journal")
    s.add_argument("dir", help="the campaign directory (RUNS_ROOT/campaigns/NAME)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--png", default=None, metavar="FILE", help="also write a Gantt chart of the week")
    s.set_defaults(func=cmd_status)
    v = csub.add_parser("validate", help="check a campaign spec; every problem listed by path")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from uff_port.campaign.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print("invalid campaign spec:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return 2
    print(f"{spec.name}: {len(spec.models)} models, valid")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from uff_port.campaign.journal import JournalError, fold, load
    from uff_port.campaign.status import billed_hours, render_table, write_gantt

    try:
        view = fold(load(args.dir))
    except JournalError as exc:
        print(f"campaign status: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    billed = billed_hours(Path(args.dir), view)
    if args.png:
        write_gantt(view, Path(args.png), now)
    if args.json:
        print(json.dumps({**view.to_dict(now), "billed_hours": billed}, indent=2, sort_keys=True))
    else:
        render_table(view, now, billed)
    return 0
