"""Worker extension commands of the campaign plane (docs/internals.md section 2).

    campaign_plan     -> uff_port.campaign.commands:campaign_plan
    campaign_release  -> uff_port.campaign.commands:campaign_release

`campaign_plan` is read-only (it writes nothing): it validates the spec and
places its jobs with the planner behind `plan-week`. `campaign_release` fuses the stable artifact of
each role into a release descriptor (idempotent: the same artifacts give the
same release, written once) and keeps the newest `keep` releases on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Final

from uff_port.campaign.spec import (
    SpecError,
    job_overrides,
    load_spec,
    rl_overrides,
    topo_order,
    validate_spec,
)
from uff_port.core.config import ConfigError, load_config_file, validate_config
from uff_port.fsutil import confine
from uff_port.protocol import CommandError, ErrorCode

CAMPAIGNS_DIR: Final = "campaigns"
RELEASES_DIR: Final = "releases"


def _spec(args: dict[str, Any], ctx: Any) -> tuple[Any, Path | None]:
    raw, path = args.get("spec"), args.get("spec_path")
    try:
        if isinstance(raw, dict):
            return validate_spec(raw), None
        if isinstance(path, str) and path:
            return load_spec(path), Path(path)
    except SpecError as exc:
        raise CommandError(ErrorCode.INVALID_CONFIG, str(exc), {"problems": exc.problems}) from None
    raise CommandError(ErrorCode.INVALID_ARGS, "args: give `spec` (a map) or `spec_path` (a YAML file)")


def _resolve_preset(preset: str, base: Path | None) -> str:
    if base is not None and not Path(preset).is_absolute() and (base.parent / preset).exists():
        return str((base.parent / preset).resolve())
    return preset


def campaign_plan(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """args: `spec` or `spec_path`, optional `start` (unix). The job graph with placement."""
    from uff_port.cloud.ledger import QuotaLedger
    from uff_port.cloud.routing import plan_week
    from uff_port.cloud.settings import validate_cloud

    spec, path = _spec(args, ctx)
    from uff_port.cloud.timescale import now

    try:
        start = float(args.get("start") or now())  # simulated in simulations (uff_port.cloud.timescale)
    except ValueError as exc:
        raise CommandError(ErrorCode.INVALID_CONFIG, str(exc)) from None
    try:
        settings = validate_cloud({**spec.cloud, "budgets": {
            **(spec.cloud.get("budgets") or {}),
            "kaggle_hours_per_week": spec.budgets.kaggle_hours_per_week,
            "sagemaker_hours_per_day": spec.budgets.sagemaker_hours_per_day,
        }})
    except ConfigError as exc:
        raise CommandError(ErrorCode.INVALID_CONFIG, str(exc), {"problems": exc.problems}) from None
    # One ledger per runs root: the budgets are the account's, shared by every campaign and `train`.
    ledger_path = settings.ledger_path or str(Path(ctx.runs_root).resolve() / ".cloud-ledger.jsonl")
    cloud = {**spec.cloud, "budgets": settings.budgets.model_dump(), "ledger_path": ledger_path}
    ordered = topo_order(spec)
    hybrid = [(m.name, m.hours) for m in ordered if spec.strategy_of(m) == "hybrid"]
    week = None
    if hybrid:
        week = plan_week(hybrid, settings, start, strategy="hybrid", ledger=QuotaLedger(ledger_path, settings.budgets))
    placed = {e.job for e in week.entries} if week is not None else set()
    jobs = []
    for m in ordered:
        strategy = spec.strategy_of(m)
        # A placed hybrid job routes each session itself (the worker's hybrid routing, clouds only).
        backend = strategy if strategy != "hybrid" else ("hybrid" if m.name in placed else None)
        if backend is None:  # the cloud week is full: a local GPU takes it, if there is one
            backend = "local" if spec.budgets.local_gpus > 0 else None
        preset, overrides, cfg = _placed_stage(m.preset, job_overrides(spec, m), backend, cloud, path)
        gates = _gates(m.gates or spec.promotion.gates, path, m.name)
        rl = None
        if "rl" in m.stages and m.rl is not None:
            rl_preset, rl_over, rl_cfg = _placed_stage(m.rl.preset, rl_overrides(spec, m), backend, cloud, path)
            rl = {
                "run_dir": f"{CAMPAIGNS_DIR}/{spec.name}/{m.name}-rl",
                "max_steps": rl_cfg.training.max_steps,
                "train": {"config_path": rl_preset, "overrides": rl_over},
            }
        jobs.append({
            "name": m.name,
            "role": spec.role_of(m),
            "strategy": strategy,
            "backend": backend,
            "unplaced_reason": None if backend else "does not fit this week's cloud budgets and there is no local GPU",
            "parent": m.parent,
            "deps": [m.parent] if m.parent else [],
            "hours": m.hours,
            "stages": list(m.stages),
            "max_steps": cfg.training.max_steps,
            "run_dir": f"{CAMPAIGNS_DIR}/{spec.name}/{m.name}",
            "train": {"config_path": preset, "overrides": overrides},
            "rl": rl,
            "eval": m.eval.model_dump() if m.eval.suites else None,
            "gates": gates,
        })
    return {
        "name": spec.name,
        "campaign_dir": f"{CAMPAIGNS_DIR}/{spec.name}",
        "jobs": jobs,
        "budgets": spec.budgets.model_dump(),
        "schedule": spec.schedule.model_dump(),
        "promotion": spec.promotion.model_dump(),
        "release": spec.release.model_dump(),
        "placement": week.to_dict() if week is not None else {"entries": [], "unscheduled": {}},
        "placement_text": week.render() if week is not None else "",
    }


def _placed_stage(preset: str, overrides: dict[str, Any], backend: str | None, cloud: dict[str, Any],
                  spec_path: Path | None) -> tuple[str, dict[str, Any], Any]:
    """A stage's (preset path, overrides, validated config) on the backend the plan placed its model on.

    A cloud stage gets the campaign's `cloud:` map with the campaign's budgets
    and the runs root's ledger; a hybrid one never takes the local GPU behind
    the campaign's slots (`local_gpu: no`).
    """
    overrides["strategy"] = backend or "local"
    if backend in (None, "local"):
        overrides.pop("cloud", None)
    else:
        overrides["cloud"] = {**cloud, **({"local_gpu": "no"} if backend == "hybrid" else {})}
    resolved = _resolve_preset(preset, spec_path)
    return resolved, overrides, validate_config(load_config_file(resolved), overrides)


def _gates(gates: str | None, spec_path: Path | None, job: str) -> dict[str, Any] | None:
    """A job's gates file, validated and returned as a map.

    The plan carries the gates themselves (journaled with it; `promote` takes
    them as `gates_config`), so planning writes nothing and the campaign
    promotes with the gates it planned with even if the file changes later.
    """
    if not gates:
        return None
    from uff_port.registry.errors import RegistryError
    from uff_port.registry.gates import load_gates

    src = Path(_resolve_preset(gates, spec_path))
    try:
        return load_gates(src).model_dump(mode="json")
    except RegistryError as exc:
        raise CommandError(ErrorCode.INVALID_CONFIG, f"models.{job}.gates: {exc.message}",
                           {"problems": [f"gates: {exc.message}"]}) from None


def _next_version(releases: Path) -> str:
    newest: tuple[int, ...] = (0, 0, 0)
    for p in releases.glob("*.json"):
        try:
            v = json.loads(p.read_text()).get("version", "")
            newest = max(newest, tuple(int(x) for x in v.split("+")[0].split("-")[0].split(".")))
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return f"{newest[0]}.{newest[1]}.{newest[2] + 1}" if newest != (0, 0, 0) else "1.0.0"


def campaign_release(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """args: `roles` (list), optional `campaign`, `version`, `keep` (default 3), `registry`.

    Fuses each role's stable artifact (as stored in the registry, re-hashed).
    A role with no stable artifact is left out and named in `missing`.
    """
    from uff_port.registry.errors import RegistryError
    from uff_port.registry.federate import federate, write_release
    from uff_port.registry.store import ENV_VAR, Registry

    roles = args.get("roles")
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise CommandError(ErrorCode.INVALID_ARGS, "roles: expected a non-empty list of role names")
    keep = args.get("keep", 3)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= 100:
        raise CommandError(ErrorCode.INVALID_ARGS, "keep: expected an integer in [1, 100]")
    runs_root = Path(ctx.runs_root)
    reg_root = Path(os.environ.get(ENV_VAR) or runs_root / "registry")
    out_dir = confine(runs_root, RELEASES_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs: list[tuple[str, str | Path]] = []
    missing: list[str] = []
    with Registry(reg_root) as reg:
        for role in roles:
            stable = reg.aliases(role).get("stable")
            if stable is None:
                missing.append(role)
            else:
                inputs.append((role, reg.artifact_dir(stable)))
    if not inputs:
        raise CommandError(ErrorCode.NOT_FOUND, f"roles: none of {', '.join(roles)} has a stable artifact")
    version = args.get("version") or None
    try:
        probe = federate(inputs, None, version=version or "0.0.0")
        for p in sorted(out_dir.glob("*.json")):  # the same artifacts: that release already exists
            try:
                old = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(old, dict) and old.get("release_id") == probe["release_id"]:
                return {**old, "path": str(p), "missing": missing, "created": False, "kept": _kept(out_dir)}
        release = federate(inputs, None, version=version or _next_version(out_dir),
                           created_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    except RegistryError as exc:
        raise CommandError(exc.code, exc.message, exc.details) from None
    if args.get("campaign"):
        release["campaign"] = str(args["campaign"])
    path = write_release(release, out_dir / f"{release['name']}.json")
    _prune(out_dir, keep)
    return {**release, "path": str(path), "missing": missing, "created": True, "kept": _kept(out_dir)}


def _kept(out_dir: Path) -> list[str]:
    return [p.name for p in sorted(out_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)]


def _prune(out_dir: Path, keep: int) -> None:
    """Keep the newest `keep` releases: the new one and the ones rollback may need."""
    files = sorted(out_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for p in files[:-keep]:
        p.unlink(missing_ok=True)
