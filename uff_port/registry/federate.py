"""Fuse provider manifests (hf, gcp, aws, ...) into one release descriptor.

Each site ships standard artifact manifests; the release is their union, one
artifact per role, named `spiralverse-ai-federated-vX.Y.Z`. Inputs must agree
on what makes adapters interchangeable (base model, revision, tokenizer,
interface contract) and may repeat a role only with the same content id (a
mirror). The output is deterministic: same inputs, same bytes; a timestamp
appears only when the caller injects one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import atomic_write_text
from uff_port.hashing import verify_tree
from uff_port.registry.errors import (
    GATE_FAILED,
    INCONSISTENT_RELEASE,
    INVALID_ARGS,
    INVALID_MANIFEST,
    NOT_FOUND,
    VERIFY_FAILED,
    RegistryError,
)
from uff_port.registry.gates import (
    Evidence,
    GateResult,
    GatesConfig,
    compatibility_gate,
    latency_gate,
    quality_gate,
)
from uff_port.registry.manifest import MANIFEST_NAME, SEMVER_RE, ArtifactManifest, parse_manifest
from uff_port.registry.runmanifest import content_excludes

RELEASE_PREFIX: Final = "spiralverse-ai-federated"
RELEASE_SCHEMA: Final = 1
_PROVIDER_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _semver_key(version: str) -> tuple[int, int, int, int]:
    core = version.split("+", 1)[0]
    nums, _, pre = core.partition("-")
    major, minor, patch = (int(x) for x in nums.split("."))
    return (major, minor, patch, 0 if pre else 1)  # a pre-release sorts before its release


def read_provider(provider: str, path: str | Path) -> tuple[list[ArtifactManifest], str]:
    """Artifacts of one provider file (one manifest, or `{"artifacts": [...]}`) and its sha256.

    A directory is an artifact as downloaded (files + artifact.json): its files
    are re-hashed against the manifest too.
    """
    p = Path(path)
    if p.is_dir():
        artifacts, digest = read_provider(provider, p / MANIFEST_NAME)
        for m in artifacts:
            report = verify_tree(p, m.files_dict(), exclude=content_excludes(p))
            if not report.ok:
                raise RegistryError(
                    VERIFY_FAILED, f"{provider}.files: {report.summary()}",
                    {"field": "files", "provider": provider, "verify": report.to_dict()},
                )
        return artifacts, digest
    try:
        data = p.read_bytes()
    except OSError:
        raise RegistryError(NOT_FOUND, f"{provider}: no manifest at {str(p)!r}") from None
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise RegistryError(INVALID_MANIFEST, f"{provider}: {p} is not valid JSON ({exc})") from None
    items = raw.get("artifacts") if isinstance(raw, dict) and "artifacts" in raw else [raw]
    if not isinstance(items, list) or not items:
        raise RegistryError(INVALID_MANIFEST, f"{provider}.artifacts: expected a non-empty list")
    out = []
    for i, item in enumerate(items):
        where = provider if len(items) == 1 and items[0] is raw else f"{provider}.artifacts[{i}]"
        try:
            out.append(parse_manifest(item))
        except RegistryError as exc:
            problems = [f"{where}.{pr}" for pr in (exc.details or {}).get("problems", [exc.message])]
            raise RegistryError(INVALID_MANIFEST, "; ".join(problems), {"problems": problems}) from None
    return out, hashlib.sha256(data).hexdigest()


def _agree(field: str, values: dict[str, Any]) -> Any:
    distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
    if len(distinct) > 1:
        listing = ", ".join(f"{who}={v!r}" for who, v in sorted(values.items()))
        raise RegistryError(
            INCONSISTENT_RELEASE, f"{field}: inputs disagree ({listing})", {"field": field, "values": values}
        )
    return next(iter(values.values()))


def _gates_for(
    cfg: GatesConfig, m: ArtifactManifest, pinned: ArtifactManifest, previous: ArtifactManifest | None
) -> list[GateResult]:
    """Gates on manifests alone: latency/safety read the measurements the site recorded in metrics.

    Quality and compatibility compare with the same role in the previous release when one is given.
    """
    ev = Evidence(m.metrics.get("latency_p95_ms"), m.metrics.get("tokens_per_s"), source="metrics")
    results = [quality_gate(cfg.quality, m, previous), latency_gate(cfg.latency, ev, optional=True)]
    violations = m.metrics.get("safety_violations")
    if not cfg.safety.enabled:
        results.append(GateResult("safety", "skip", "-", "-", "disabled"))
    elif violations is None:
        results.append(GateResult("safety", "skip", "missing", "0 violations", "no metrics.safety_violations"))
    else:
        results.append(GateResult("safety", "fail" if violations > 0 else "pass",
                                  f"{violations:g} violations", "0 violations"))
    results.append(compatibility_gate(cfg.compatibility, m, previous or pinned))
    return results


def baseline_artifacts(release: Any) -> dict[str, ArtifactManifest]:
    """The per-role manifests of an earlier release descriptor (the quality baseline)."""
    arts = release.get("artifacts") if isinstance(release, dict) else None
    if not isinstance(arts, dict):
        raise RegistryError(INVALID_MANIFEST, "baseline.artifacts: expected a release descriptor")
    out = {}
    for role, entry in arts.items():
        raw = {k: v for k, v in entry.items() if k != "providers"} if isinstance(entry, dict) else entry
        try:
            out[role] = parse_manifest(raw)
        except RegistryError as exc:
            raise RegistryError(INVALID_MANIFEST, f"baseline.artifacts.{role}.{exc.message}") from None
    return out


def federate(
    inputs: Sequence[tuple[str, str | Path]],
    gates: GatesConfig | None,
    *,
    version: str | None = None,
    prefix: str = RELEASE_PREFIX,
    created_at: str | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the release descriptor; raise RegistryError naming the field on any inconsistency."""
    if not inputs:
        raise RegistryError(INVALID_ARGS, "manifest: give at least one provider=PATH")
    providers: dict[str, dict[str, Any]] = {}
    by_role: dict[str, tuple[ArtifactManifest, list[str]]] = {}
    everyone: dict[str, ArtifactManifest] = {}
    for provider, path in inputs:
        if not provider or not set(provider) <= _PROVIDER_CHARS or provider in providers:
            raise RegistryError(INVALID_ARGS, f"manifest: bad or repeated provider name {provider!r}")
        artifacts, digest = read_provider(provider, path)
        providers[provider] = {"manifest_sha256": digest, "roles": sorted(a.role for a in artifacts)}
        for i, m in enumerate(artifacts):
            everyone[f"{provider}[{i}]" if len(artifacts) > 1 else provider] = m
            held = by_role.get(m.role)
            if held is None:
                by_role[m.role] = (m, [provider])
            elif held[0].artifact_id != m.artifact_id:
                raise RegistryError(
                    INCONSISTENT_RELEASE,
                    f"role: {m.role!r} comes from {held[1][0]} as {held[0].short_id} "
                    f"and from {provider} as {m.short_id}; one artifact per role",
                    {"field": "role", "role": m.role, "artifact_ids": [held[0].artifact_id, m.artifact_id]},
                )
            elif held[0].to_dict() != m.to_dict():
                raise RegistryError(
                    INCONSISTENT_RELEASE,
                    f"role: {m.role!r} has the same artifact_id from {held[1][0]} and {provider} "
                    "but different metadata",
                    {"field": "role", "role": m.role},
                )
            else:
                held[1].append(provider)
    base = {
        "id": _agree("base_model.id", {k: m.base_model.id for k, m in everyone.items()}),
        "revision": _agree("base_model.revision", {k: m.base_model.revision for k, m in everyone.items()}),
    }
    tokenizer = _agree("tokenizer_hash", {k: m.tokenizer_hash for k, m in everyone.items()})
    contract = _agree("interface.contract", {k: m.interface.contract for k, m in everyone.items()})
    if version is None:
        version = max((m.version for m, _ in by_role.values()), key=_semver_key)
    elif not SEMVER_RE.match(version):
        raise RegistryError(INVALID_ARGS, f"version: expected X.Y.Z, got {version!r}")
    gate_rows: list[dict[str, Any]] = []
    if gates is not None:
        pinned = next(iter(by_role.values()))[0]
        previous = baseline_artifacts(baseline) if baseline is not None else {}
        for role in sorted(by_role):
            for g in _gates_for(gates, by_role[role][0], pinned, previous.get(role)):
                gate_rows.append({"role": role, **g.to_dict()})
    fused = {
        role: {**m.to_dict(), "providers": sorted(who)} for role, (m, who) in sorted(by_role.items())
    }
    release_id = hashlib.sha256(
        "".join(f"{a['artifact_id']}  {r}\n" for r, a in fused.items()).encode()
    ).hexdigest()
    release: dict[str, Any] = {
        "schema_version": RELEASE_SCHEMA,
        "kind": "uff-port.release",
        "name": f"{prefix}-v{version}",
        "version": version,
        "release_id": release_id,
        "base_model": base,
        "tokenizer_hash": tokenizer,
        "interface_contract": contract,
        "roles": sorted(by_role),
        "artifacts": fused,
        "providers": dict(sorted(providers.items())),
        "gates": gate_rows,
    }
    if created_at is not None:
        release["created_at"] = created_at
    failed = [r for r in gate_rows if r["status"] == "fail"]
    if failed:
        raise RegistryError(
            GATE_FAILED,
            "release refused by gates: " + "; ".join(f"{r['role']}.{r['gate']}: {r['detail']}" for r in failed),
            {"gates": gate_rows, "name": release["name"]},
        )
    return release


def write_release(release: dict[str, Any], output: str | Path) -> Path:
    out = Path(output)
    atomic_write_text(out, json.dumps(release, indent=2, sort_keys=True) + "\n")
    return out


def parse_manifest_flags(values: list[str]) -> list[tuple[str, str]]:
    """`hf=A.json` -> ("hf", "A.json"); a bare path gets provider p1, p2, ..."""
    out = []
    for i, value in enumerate(values, 1):
        provider, sep, path = value.partition("=")
        if not sep:
            provider, path = f"p{i}", value
        if not path:
            raise RegistryError(INVALID_ARGS, f"manifest: {value!r} is not PROVIDER=PATH")
        out.append((provider.strip().lower(), path))
    return out
