"""Worker commands `register`, `promote`, `rollback`, `releases` (docs/internals.md section 2).

Each runs in a short-lived child of the worker. Every path a client sends is
confined to `ctx.runs_root`; the registry is `$UFF_PORT_REGISTRY` or
`<runs_root>/registry` unless the client names one inside the run root.
Events: `artifact_registered`, `gate_result` (one per gate), `alias_moved`,
`promotion_refused`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from uff_port.fsutil import confine
from uff_port.registry.errors import GATE_FAILED, INVALID_ARGS, RegistryError
from uff_port.registry.store import ENV_VAR, Registry


class TaskContext(Protocol):
    runs_root: Path

    def emit(self, event: str, **fields: Any) -> None: ...


def _path(ctx: TaskContext, args: dict[str, Any], key: str, required: bool = True) -> Path | None:
    value = args.get(key)
    if value is None:
        if required:
            raise RegistryError(INVALID_ARGS, f"args.{key}: required (a path under the run root)")
        return None
    if not isinstance(value, str) or not value:
        raise RegistryError(INVALID_ARGS, f"args.{key}: expected a non-empty string path")
    try:
        return confine(ctx.runs_root, value)
    except ValueError as exc:
        raise RegistryError(INVALID_ARGS, f"args.{key}: {exc}") from None


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = args.get(key, default)
    if value is not None and not isinstance(value, str):
        raise RegistryError(INVALID_ARGS, f"args.{key}: expected a string, got {type(value).__name__}")
    return value


def _registry(args: dict[str, Any], ctx: TaskContext) -> Registry:
    chosen = _path(ctx, args, "registry", required=False)
    if chosen is None:
        chosen = Path(os.environ.get(ENV_VAR) or Path(ctx.runs_root) / "registry")
    return Registry(chosen)


def register(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: `run_dir` (or `path`: artifact dir / manifest), optional `role`, `version`, `name`."""
    from uff_port.registry.service import check_role, register_path, summary

    target = _path(ctx, args, "run_dir" if "run_dir" in args else "path")
    assert target is not None
    with _registry(args, ctx) as reg:
        manifest, created = register_path(
            reg, target, role=check_role(_str(args, "role")), version=_str(args, "version"),
            name=_str(args, "name"), actor="worker",
        )
    out = {**summary(manifest), "created": created}
    # `name` is the event's own name in the worker's emit(); the artifact's goes as artifact_name
    ctx.emit("artifact_registered", **{k: v for k, v in out.items() if k != "name"},
             artifact_name=manifest.name)
    return out


def promote(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: `artifact` (id, prefix or alias), optional `to`, `gates` (a path) or `gates_config`
    (the same as a map), `bench_results`, `expect`."""
    from uff_port.registry.gates import gates_from_map, load_evidence, load_gates
    from uff_port.registry.promotion import UNSET
    from uff_port.registry.promotion import promote as run_promote

    ref = _str(args, "artifact")
    if not ref:
        raise RegistryError(INVALID_ARGS, "args.artifact: required (id, id prefix or alias)")
    gates_path = _path(ctx, args, "gates", required=False)
    bench = _path(ctx, args, "bench_results", required=False)
    base_model = _path(ctx, args, "base_model", required=False)
    expect = _str(args, "expect") if "expect" in args else UNSET
    if gates_path is not None and args.get("gates_config") is not None:
        raise RegistryError(INVALID_ARGS, "args: give `gates` or `gates_config`, not both")
    gates = gates_from_map(args["gates_config"]) if args.get("gates_config") is not None else load_gates(gates_path)
    with _registry(args, ctx) as reg:
        result = run_promote(
            reg, ref, gates, target=_str(args, "to", "stable") or "stable",
            evidence=load_evidence(bench) if bench else None, expect=expect,
            base_model=str(base_model) if base_model else None, device=_str(args, "device", "cpu") or "cpu",
            actor="worker",
        )
    out = result.to_dict()
    for gate in out["gates"]:
        ctx.emit("gate_result", artifact_id=out["artifact_id"], **gate)
    if not result.passed:
        ctx.emit("promotion_refused", artifact_id=out["artifact_id"], role=out["role"],
                 alias=out["alias"], gates=out["gates"])
        failed = [f"{g['gate']}: {g['detail']}" for g in out["gates"] if g["status"] == "fail"]
        raise RegistryError(GATE_FAILED, "promotion refused: " + "; ".join(failed), out)
    if result.moved:
        ctx.emit("alias_moved", role=out["role"], alias=out["alias"], artifact_id=out["artifact_id"],
                 replaced=out["replaced"], action="promote", audit_seq=out["audit_seq"])
    return out


def rollback(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: optional `role` (default textgen)."""
    from uff_port.registry.promotion import rollback as run_rollback
    from uff_port.registry.service import check_role

    role = check_role(_str(args, "role", "textgen")) or "textgen"
    with _registry(args, ctx) as reg:
        out = run_rollback(reg, role, actor="worker")
    ctx.emit("alias_moved", role=role, alias="stable", artifact_id=out["stable"],
             replaced=out["previous"], action="rollback", audit_seq=out["audit_seq"])
    return out


def releases(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: optional `role`, `audit` (bool): aliases per role and the stable release history."""
    from uff_port.registry.service import check_role, releases_view

    role = check_role(_str(args, "role"))
    with _registry(args, ctx) as reg:
        view = releases_view(reg, role)
        if args.get("audit"):
            view["audit"] = reg.audit(role)
    return view
