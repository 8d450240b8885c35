"""Worker commands `deploy` and `deploy_rollback`: the same code as `uff-port deploy`.

Like the other registry commands they run in a short-lived child of the
worker. The serving directory must lie under `$UFF_PORT_SERVING_ROOT` when
that is set (an inference host's tree, outside the run root), else under the
run root; a release descriptor must lie under the run root. Events:
`deployed` (one per role), `adapter_reloaded` (one per reload hook call),
`deploy_rolled_back`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import confine
from uff_port.registry.commands import TaskContext, _path, _registry, _str
from uff_port.registry.errors import INVALID_ARGS, RegistryError

SERVING_ROOT_ENV: Final = "UFF_PORT_SERVING_ROOT"


def _target(ctx: TaskContext, args: dict[str, Any]) -> Path:
    value = args.get("target")
    if not isinstance(value, str) or not value:
        raise RegistryError(INVALID_ARGS, "args.target: required (the serving directory, a string path)")
    root = os.environ.get(SERVING_ROOT_ENV) or ctx.runs_root
    try:
        return confine(root, value)
    except ValueError as exc:
        raise RegistryError(INVALID_ARGS, f"args.target: {exc}") from None


def _hooks(args: dict[str, Any]) -> Any:
    from uff_port.registry.deploy import ReloadHooks

    command, url = _str(args, "reload_cmd"), _str(args, "vllm_url")
    return ReloadHooks(command=command, vllm_url=url) if (command or url) else None


def deploy(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: `target`, and `roles` (["ufm", "ucm=<ref>", ...]) or `release` (a descriptor path);
    optional `keep`, `unhold`, `reload_cmd`, `vllm_url`, `port`."""
    from uff_port.registry import deploy as dp

    target = _target(ctx, args)
    roles = args.get("roles")
    release = _path(ctx, args, "release", required=False)
    if (roles is None) == (release is None):
        raise RegistryError(INVALID_ARGS, "args.roles/args.release: give exactly one")
    if roles is not None and (not isinstance(roles, list) or not all(isinstance(r, str) for r in roles)):
        raise RegistryError(INVALID_ARGS, "args.roles: expected a list of strings like \"ufm\" or \"ufm=<ref>\"")
    keep, port = args.get("keep", dp.KEEP_DEFAULT), args.get("port", 8000)
    if not isinstance(keep, int) or isinstance(keep, bool) or not isinstance(port, int):
        raise RegistryError(INVALID_ARGS, "args.keep/args.port: expected integers")
    with _registry(args, ctx) as reg:
        plan = dp.plan_from_release(reg, release) if release else dp.plan_from_roles(reg, roles or [])
        result = dp.deploy(reg, target, plan, keep=keep, unhold=bool(args.get("unhold")),
                           hooks=_hooks(args), port=port)
    out = result.to_dict()
    for s in out["roles"]:
        ctx.emit("deployed", **s, target=out["target"])
    for r in out["reloads"]:
        ctx.emit("adapter_reloaded", **r)
    return out


def deploy_rollback(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """args: `target`, `role`; optional `hold` (keep the rolled-back artifact out), `reload_cmd`, `vllm_url`."""
    from uff_port.registry import deploy as dp
    from uff_port.registry.service import check_role

    target = _target(ctx, args)
    role = check_role(_str(args, "role"))
    if role is None:
        raise RegistryError(INVALID_ARGS, "args.role: required (ufm, ucm, ...)")
    with _registry(args, ctx) as reg:
        out = dp.rollback_role(reg, target, role, actor="worker", hold=bool(args.get("hold")),
                               hooks=_hooks(args))
    ctx.emit("deploy_rolled_back", role=role, rolled_back=out["rolled_back"], restored=out["restored"],
             version=out["version"], registry=out["registry"])
    return out
