"""`uff-port register|artifacts|promote|rollback|releases|federate`.

Imports nothing heavy: the generation benchmark (torch) loads only inside
`promote`, and only when a gate needs a measurement that was not supplied.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from uff_port.protocol.errors import ErrorCode
from uff_port.registry.errors import VERIFY_FAILED, RegistryError

_REGISTRY_HELP = "registry directory (default: $UFF_PORT_REGISTRY or ./registry)"


def _console() -> Any:
    from rich.console import Console

    return Console(width=max(100, Console().width))


def _open(args: argparse.Namespace) -> Any:
    from uff_port.registry.store import Registry

    return Registry(args.registry)


def _gates_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    with_role = any("role" in r for r in rows)
    if with_role:
        table.add_column("role")
    for col in ("gate", "result", "measured", "threshold", "detail"):
        table.add_column(col, overflow="fold")
    style = {"pass": "[green]PASS[/]", "fail": "[bold red]FAIL[/]", "skip": "[yellow]skip[/]"}
    for r in rows:
        cells = [r["gate"], style[r["status"]], r["measured"], r["threshold"], r["detail"]]
        table.add_row(*([r.get("role", "")] if with_role else []), *cells)
    return table


def run_reporting(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except RegistryError as exc:
            print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
            for problem in (exc.details or {}).get("problems", []) if isinstance(exc.details, dict) else []:
                print(f"  {problem}", file=sys.stderr)
            return exc.exit_code

    return wrapper


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_register(args: argparse.Namespace) -> int:
    from uff_port.registry.service import check_role, register_path, summary

    with _open(args) as reg:
        manifest, created = register_path(
            reg, Path(args.path), role=check_role(args.role), version=args.version, name=args.name
        )
        if args.alias_candidate:
            # a candidate is only a pointer for humans and pipelines; it is re-gated at promotion
            reg.move_aliases(manifest.role, {"candidate": manifest.artifact_id}, {}, "candidate")
    out = {**summary(manifest), "created": created}
    if args.json:
        print_json(out)
    else:
        verb = "registered" if created else "already registered"
        print(f"{verb} {manifest.role} {manifest.name} v{manifest.version}: {manifest.artifact_id}")
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    from rich.table import Table

    with _open(args) as reg:
        if args.action == "list":
            rows = reg.artifacts(args.role)
            if args.json:
                print_json(rows)
                return 0
            table = Table(title=f"artifacts in {reg.root}")
            for col in ("id", "role", "name", "version", "aliases"):
                table.add_column(col)
            for r in rows:
                table.add_row(r["artifact_id"][:12], r["role"], r["name"], r["version"], ", ".join(r["aliases"]))
            _console().print(table)
            return 0
        if not args.ref:
            raise RegistryError(ErrorCode.INVALID_ARGS, f"artifact: `artifacts {args.action}` needs an id or alias")
        manifest = reg.resolve(args.ref, args.role)
        if args.action == "show":
            print_json(manifest.to_dict())
            return 0
        report = reg.verify(manifest.artifact_id)
        if args.json:
            print_json({"artifact_id": manifest.artifact_id, "ok": report.ok, **report.to_dict()})
        else:
            print(f"{manifest.artifact_id}: {report.summary()}")
        return 0 if report.ok else RegistryError(VERIFY_FAILED, "").exit_code


def cmd_promote(args: argparse.Namespace) -> int:
    from uff_port.registry.gates import load_evidence, load_gates
    from uff_port.registry.promotion import UNSET, promote

    gates = load_gates(args.gates)
    evidence = load_evidence(args.bench_results) if args.bench_results else None
    expect: Any = UNSET
    if args.expect is not None:
        expect = None if args.expect.lower() == "none" else args.expect
    with _open(args) as reg:
        if expect not in (UNSET, None):
            expect = reg.resolve(expect).artifact_id
        result = promote(reg, args.ref, gates, target=args.to, evidence=evidence, expect=expect,
                         base_model=args.base_model, device=args.device)
    rows = [g.to_dict() for g in result.gates]
    if args.json:
        print_json(result.to_dict())
    else:
        a = result.artifact
        verdict = "promoted" if result.moved else ("unchanged" if result.passed else "REFUSED")
        _console().print(_gates_table(rows, f"{a.role}:{args.to} <- {a.short_id} v{a.version}: {verdict}"))
    if not result.passed:
        return RegistryError(ErrorCode.GATE_FAILED, "").exit_code
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from uff_port.registry.promotion import rollback

    with _open(args) as reg:
        out = rollback(reg, args.role)
    if args.json:
        print_json(out)
    else:
        print(f"{out['role']}:stable -> {out['stable']} (v{out['version']}); previous -> {out['previous']}")
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    from rich.table import Table

    from uff_port.registry.service import releases_view

    with _open(args) as reg:
        view = releases_view(reg, args.role)
        if args.audit:
            view["audit"] = reg.audit(args.role)
    if args.json:
        print_json(view)
        return 0
    table = Table(title="aliases")
    for col in ("role", "candidate", "stable", "previous"):
        table.add_column(col)
    for role, al in view["aliases"].items():
        table.add_row(role, *((al.get(a) or "-")[:12] for a in ("candidate", "stable", "previous")))
    history = Table(title="stable releases (oldest first)")
    for col in ("seq", "role", "action", "artifact", "version", "replaced"):
        history.add_column(col)
    for r in view["releases"]:
        history.add_row(str(r["seq"]), r["role"], r["action"], r["artifact_id"][:12],
                        str(r["version"]), (r["replaced"] or "-")[:12])
    console = _console()
    console.print(table)
    console.print(history)
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from uff_port.registry.federate import federate, parse_manifest_flags, write_release
    from uff_port.registry.gates import load_gates
    from uff_port.registry.hub import resolve_inputs as resolve_hub_inputs

    gates = None if args.no_gates else load_gates(args.gates)
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(ErrorCode.INVALID_ARGS, f"baseline: cannot read {args.baseline}: {exc}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="uff-federate-") as tmp:  # manifests read from the Hub
            inputs = resolve_hub_inputs(parse_manifest_flags(args.manifest), Path(tmp))
            release = federate(inputs, gates, version=args.version,
                               created_at=args.created_at, baseline=baseline)
    except RegistryError as exc:
        if isinstance(exc.details, dict) and exc.details.get("gates"):
            _console().print(_gates_table(exc.details["gates"], f"{exc.details.get('name')}: REFUSED"))
        raise
    write_release(release, args.output)
    if release["gates"]:
        _console().print(_gates_table(release["gates"], f"{release['name']}: accepted"))
    print(f"wrote {release['name']} ({len(release['roles'])} roles) to {args.output}")
    return 0


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help=_REGISTRY_HELP)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = subparsers.add_parser("register", parents=[common], help="register a finished run or an artifact",
                              description="Hash a run's final/ adapter (writing final/artifact.json if "
                              "missing) or an artifact directory / manifest, and store it content-addressed.")
    p.add_argument("path", help="run directory, artifact directory or artifact.json")
    p.add_argument("--role", help="textgen, embed, runtime or a manager domain (ufm ... uam)")
    p.add_argument("--version", help="semantic version, e.g. 1.2.0")
    p.add_argument("--name")
    p.add_argument("--candidate", dest="alias_candidate", action="store_true",
                   help="also point the role's `candidate` alias at it")
    p.set_defaults(func=run_reporting(cmd_register))

    p = subparsers.add_parser("artifacts", parents=[common], help="list, show or verify registered artifacts")
    p.add_argument("action", choices=("list", "show", "verify"),
                   help="list: table of artifacts; show: the manifest; verify: re-hash the stored files")
    p.add_argument("ref", nargs="?", help="id, unique id prefix, alias (stable) or role:alias (ufm:stable)")
    p.add_argument("--role", help="list only this role; the role of a bare alias (default textgen)")
    p.set_defaults(func=run_reporting(cmd_artifacts))

    p = subparsers.add_parser("promote", parents=[common], help="run the gates and move an alias",
                              description="Verify the artifact, run the gates of --gates against the "
                              "current stable release, and move the alias only if every gate passes.")
    p.add_argument("ref", help="artifact id, prefix or alias")
    p.add_argument("--to", default="stable", choices=("stable", "candidate"))
    p.add_argument("--gates", help="gates YAML (default configs/gates.yaml)")
    p.add_argument("--bench-results", help="JSON of latency_p95_ms, tokens_per_s, outputs measured elsewhere")
    p.add_argument("--base-model", help="local directory of the base model for the benchmark")
    p.add_argument("--device", default="cpu")
    p.add_argument("--expect", help="move only if the alias still points at this id ('none' = unset)")
    p.set_defaults(func=run_reporting(cmd_promote))

    p = subparsers.add_parser("rollback", parents=[common], help="restore the previous stable release")
    p.add_argument("--role", default="textgen")
    p.set_defaults(func=run_reporting(cmd_rollback))

    p = subparsers.add_parser("releases", parents=[common], help="aliases and stable release history")
    p.add_argument("--role")
    p.add_argument("--audit", action="store_true", help="include every alias move (with --json)")
    p.set_defaults(func=run_reporting(cmd_releases))

    p = subparsers.add_parser("federate", help="fuse provider manifests into one release descriptor",
                              description="Merge manifests from several sites into "
                              "spiralverse-ai-federated-vX.Y.Z, refusing inconsistent inputs.")
    p.add_argument("--manifest", action="append", required=True, metavar="PROVIDER=PATH",
                   help="repeatable, e.g. --manifest hf=A.json --manifest aws=C.json; PATH may be an "
                   "artifact directory (its files are re-hashed) or hf://ORG/NAME@REV (its artifact.json)")
    p.add_argument("--output", required=True)
    p.add_argument("--version", help="release version (default: the highest artifact version)")
    p.add_argument("--gates", help="gates YAML (default configs/gates.yaml)")
    p.add_argument("--no-gates", action="store_true")
    p.add_argument("--baseline", help="the current release descriptor: quality is judged against it")
    p.add_argument("--created-at", help="timestamp to record (omitted by default: output is deterministic)")
    p.set_defaults(func=run_reporting(cmd_federate))

    from uff_port.registry import release_cli  # deploy, watch, publish, pull

    release_cli.register(subparsers)
