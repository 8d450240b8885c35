"""Worker extension commands of the cloud plane (docs/internals.md section 2).

    plan_week     -> uff_port.cloud.commands:plan_week
    cloud_status  -> uff_port.cloud.commands:cloud_status

Both are read-only: they never submit, stop or spend quota.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from uff_port.cloud.journal import Journal
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.routing import plan_week as _plan_week
from uff_port.cloud.settings import CloudSettings, validate_cloud
from uff_port.core.config import MANAGER_DOMAINS, ConfigError
from uff_port.fsutil import confine
from uff_port.protocol import CommandError, ErrorCode

DEFAULT_MAIN_HOURS: Final = 12.0
DEFAULT_ADAPTER_HOURS: Final = 4.0


def default_jobs(main_hours: float = DEFAULT_MAIN_HOURS, adapter_hours: float = DEFAULT_ADAPTER_HOURS) -> list[tuple[str, float]]:
    """The users' week: the main model, then one adapter per manager domain."""
    return [("main", main_hours)] + [(m, adapter_hours) for m in MANAGER_DOMAINS]


def _settings(args: dict[str, Any]) -> CloudSettings:
    try:
        return validate_cloud(args.get("cloud") or {})
    except ConfigError as exc:
        raise CommandError(ErrorCode.INVALID_CONFIG, str(exc), {"problems": exc.problems}) from None


def parse_jobs(raw: Any) -> list[tuple[str, float]]:
    """`[{"name": "main", "hours": 12}, ...]` or `{"main": 12, ...}`; errors name the entry."""
    if raw is None:
        return default_jobs()
    items = list(raw.items()) if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise CommandError(ErrorCode.INVALID_ARGS, "jobs: expected a non-empty list of {name, hours} or a map name -> hours")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            name, hours = item.get("name"), item.get("hours")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, hours = item
        else:
            raise CommandError(ErrorCode.INVALID_ARGS, f"jobs[{i}]: expected {{name, hours}}")
        if not isinstance(name, str) or not name:
            raise CommandError(ErrorCode.INVALID_ARGS, f"jobs[{i}].name: expected a non-empty string")
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= 1000:
            raise CommandError(ErrorCode.INVALID_ARGS, f"jobs[{i}].hours: expected a number in (0, 1000]")
        out.append((name, float(hours)))
    return out


def plan_week(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """args: `jobs` (optional), `cloud` (the config's cloud map), `start` (unix), `strategy`."""
    settings = _settings(args)
    strategy = args.get("strategy", "hybrid")
    if strategy not in ("hybrid", "kaggle", "sagemaker"):
        raise CommandError(ErrorCode.INVALID_ARGS, "strategy: expected hybrid, kaggle or sagemaker")
    start = float(args.get("start") or time.time())
    ledger = QuotaLedger(settings.ledger_path or Path(ctx.runs_root) / ".cloud-ledger.jsonl", settings.budgets)
    plan = _plan_week(parse_jobs(args.get("jobs")), settings, start, strategy=strategy, ledger=ledger)
    return {**plan.to_dict(), "text": plan.render(), "budgets": ledger.budget_view(start)}


def cloud_status(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """args: `run_dir` (under the runs root). The journal and the quota, from disk."""
    if not isinstance(args.get("run_dir"), str):
        raise CommandError(ErrorCode.INVALID_ARGS, "run_dir: expected a path under the runs root")
    try:
        run_dir = confine(ctx.runs_root, args["run_dir"])
    except ValueError as exc:
        raise CommandError(ErrorCode.INVALID_ARGS, f"run_dir: {exc}") from None
    journal = Journal.load(run_dir)
    if journal is None:
        raise CommandError(ErrorCode.NOT_FOUND, f"run_dir: {args['run_dir']} has no cloud journal")
    settings = _settings(args)
    ledger = QuotaLedger(settings.ledger_path or Path(ctx.runs_root) / ".cloud-ledger.jsonl", settings.budgets)
    return {"journal": journal.summary(), "budgets": ledger.budget_view(time.time())}
