"""`uff-port deploy|watch|publish|pull`: the last mile from the registry to the serving host.

Registered by `uff_port.registry.cli.register`; imports nothing heavy at
module level (huggingface_hub loads only inside `publish`/`pull`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from uff_port.protocol.errors import ErrorCode
from uff_port.registry.cli import print_json, run_reporting
from uff_port.registry.errors import RegistryError

_REGISTRY_HELP = "registry directory (default: $UFF_PORT_REGISTRY or ./registry)"


def _hooks(args: argparse.Namespace) -> Any:
    from uff_port.registry.deploy import ReloadHooks

    if not (args.reload_cmd or args.vllm_url):
        return None
    return ReloadHooks(command=args.reload_cmd, vllm_url=args.vllm_url)


def cmd_deploy(args: argparse.Namespace) -> int:
    from uff_port.registry import deploy as dp
    from uff_port.registry.store import Registry

    if args.status:
        print_json(dp.status(args.target))
        return 0
    with Registry(args.registry) as reg:
        if args.rollback:
            if not args.role:
                raise RegistryError(ErrorCode.INVALID_ARGS, "role: --rollback needs --role ROLE")
            outs = [dp.rollback_role(reg, args.target, spec.partition("=")[0], hooks=_hooks(args))
                    for spec in args.role]
            if args.json:
                print_json({"rollbacks": outs})
            for o in outs if not args.json else []:
                print(f"{o['role']}: rolled back {o['rolled_back'][:12]} -> {str(o['restored'])[:12]} "
                      f"(v{o['version']}); registry moved: {o['registry']['moved']}")
            return 0
        if bool(args.role) == bool(args.release):
            raise RegistryError(ErrorCode.INVALID_ARGS, "role/release: give --role ROLE[=REF] ... or --release FUSED.json")
        plan = dp.plan_from_release(reg, args.release) if args.release else dp.plan_from_roles(reg, args.role)
        result = dp.deploy(reg, args.target, plan, keep=args.keep, unhold=args.unhold,
                           hooks=_hooks(args), port=args.port)
    if args.json:
        print_json(result.to_dict())
        return 0
    for s in result.switches:
        verb = "switched" if s.changed else "unchanged"
        print(f"{s.role}: {verb} to {s.artifact_id[:12]} v{s.version}"
              + (f" (previous {s.replaced[:12]})" if s.replaced else ""))
    print(f"launch: {result.target}/vllm.sh ({len(result.launch.get('roles', {}))} LoRA modules)")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from uff_port.registry.store import default_root
    from uff_port.registry.watch import Watcher, load_slo

    def emit(event: str, /, **fields: Any) -> None:
        print(json.dumps({"event": event, "ts": time.time(), **fields}, sort_keys=True), flush=True)

    cfg = load_slo(args.slo)
    registry = None if args.no_registry else Path(args.registry) if args.registry else default_root()
    watcher = Watcher(cfg, Path(args.target), registry, emit, hooks=_hooks(args))
    watcher.run(1 if args.once else args.max_polls)
    return 0


def _api() -> Any:
    """The Hub client (HfApi with the usual token); one function so tests can swap in a fake."""
    from uff_port.registry import hub

    return hub.make_api()


def cmd_publish(args: argparse.Namespace) -> int:
    from uff_port.registry import hub
    from uff_port.registry.store import Registry

    with Registry(args.registry) as reg:
        out = hub.publish(reg, args.ref, args.repo, api=_api(), private=args.private,
                          revision=args.revision, license=args.license, role=args.role)
    if args.json:
        print_json(out)
    else:
        verb = "published" if out["created"] else "already published"
        print(f"{verb} {out['role']} {out['version']} {out['artifact_id'][:12]} to "
              f"hf://{out['repo']}@{out['tag']} (commit {out['commit'][:12]} on {out['revision']})")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from uff_port.registry import hub
    from uff_port.registry.service import summary
    from uff_port.registry.store import Registry

    with Registry(args.registry) as reg:
        manifest, created, rev = hub.pull(reg, args.source, api=_api())
    out = {**summary(manifest), "created": created, "source": args.source, "revision": rev}
    if args.json:
        print_json(out)
    else:
        verb = "registered" if created else "already registered"
        print(f"verified and {verb} {manifest.role} {manifest.name} {manifest.version}: {manifest.artifact_id}")
    return 0


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help=_REGISTRY_HELP)
    common.add_argument("--json", action="store_true", help="print JSON")
    hooks = argparse.ArgumentParser(add_help=False)
    hooks.add_argument("--reload-cmd", help="command run after each switch (env: UFF_PORT_ROLE, "
                       "UFF_PORT_ARTIFACT_ID, UFF_PORT_ADAPTER_PATH, UFF_PORT_SERVING_DIR)")
    hooks.add_argument("--vllm-url", help="vLLM server to reload through /v1/load_lora_adapter, "
                       "e.g. http://127.0.0.1:8000")

    p = subparsers.add_parser(
        "deploy", parents=[common, hooks], help="lay out adapters in a serving directory (atomic switch)",
        description="Copy each role's adapter into TARGET/<role>/versions/<id>, switch TARGET/<role>/current "
        "with one atomic rename, keep the two versions before it, and write TARGET/vllm.json and vllm.sh.")
    p.add_argument("--target", required=True, help="the serving directory the inference host reads")
    p.add_argument("--role", action="append", metavar="ROLE[=REF]",
                   help="repeatable: deploy ROLE's stable artifact, or REF (id, prefix, alias)")
    p.add_argument("--release", help="a fused release descriptor (uff-port federate): every role in it")
    p.add_argument("--keep", type=int, default=3, help="versions kept per role (default 3: current + 2)")
    p.add_argument("--unhold", action="store_true", help="deploy an artifact held after an SLO rollback")
    p.add_argument("--rollback", action="store_true", help="roll each --role back to its previous version")
    p.add_argument("--status", action="store_true", help="print what the serving directory holds")
    p.add_argument("--port", type=int, default=8000, help="port written into the launch command")
    p.set_defaults(func=run_reporting(cmd_deploy))

    p = subparsers.add_parser(
        "watch", parents=[hooks], help="roll a role back when its SLO stays breached",
        description="Poll the serving metrics (Prometheus text or JSON) every interval_s; when an SLO stays "
        "breached for its window_s, roll the role back to previous in the serving directory and the "
        "registry (audit row, slo_rollback event) and hold the rolled-back artifact. Events: JSON lines.")
    p.add_argument("--target", required=True, help="the serving directory (uff-port deploy --target)")
    p.add_argument("--slo", required=True, help="SLO YAML (docs/registry.md, Watch)")
    p.add_argument("--registry", default=None, help=_REGISTRY_HELP)
    p.add_argument("--no-registry", action="store_true", help="roll back the serving directory only")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.add_argument("--max-polls", type=int, default=None, help="stop after this many polls")
    p.set_defaults(func=run_reporting(cmd_watch))

    p = subparsers.add_parser(
        "publish", parents=[common], help="push a registered artifact to a Hugging Face Hub repo",
        description="One commit per artifact: its files exactly as registered, artifact.json and a model card; "
        "the artifact id in the commit message and as the tag artifact-<id>. Token: HF_TOKEN or the stored login.")
    p.add_argument("ref", help="artifact id, prefix or alias (ufm:stable)")
    p.add_argument("--repo", required=True, help="ORG/NAME of the model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (default main; created if missing)")
    p.add_argument("--license", default="other", help="license in the card's front matter (default other)")
    p.add_argument("--role", help="the role of a bare alias such as stable")
    p.set_defaults(func=run_reporting(cmd_publish))

    p = subparsers.add_parser(
        "pull", parents=[common], help="fetch hf://ORG/NAME@REV, verify it against its manifest, register it")
    p.add_argument("source", help="hf://ORG/NAME[@REVISION] (a branch, a commit or a tag artifact-<id>)")
    p.set_defaults(func=run_reporting(cmd_pull))
