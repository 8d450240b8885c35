"""Operations shared by the CLI and the worker commands, in plain data.

Both front ends call these and only format differently, so a terminal user and
the Elixir side see the same checks, codes and fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uff_port.registry.errors import INVALID_MANIFEST, NON_FINITE, NOT_FOUND, RegistryError
from uff_port.registry.manifest import (
    MANIFEST_NAME,
    ArtifactManifest,
    load_manifest,
    parse_manifest,
)
from uff_port.registry.runmanifest import write_run_manifest
from uff_port.registry.store import Registry
from uff_port.registry.tensors import TensorFileError, scan_tree


def locate(path: Path) -> tuple[Path, Path | None]:
    """(artifact directory, manifest path or None) for a run dir, artifact dir or manifest file."""
    if path.is_file():
        return path.parent, path
    if (path / "final").is_dir():
        path = path / "final"
    if not path.is_dir():
        raise RegistryError(NOT_FOUND, f"path: no run, artifact directory or manifest at {str(path)!r}")
    manifest = path / MANIFEST_NAME
    return path, manifest if manifest.is_file() else None


def register_path(
    reg: Registry,
    path: Path,
    *,
    role: str | None = None,
    version: str | None = None,
    name: str | None = None,
    actor: str = "cli",
) -> tuple[ArtifactManifest, bool]:
    """Register a run (writing its manifest if the worker has not), an artifact dir or a manifest."""
    artifact_dir, manifest_path = locate(path)
    require_finite_weights(artifact_dir)
    if manifest_path is None:
        if artifact_dir.name != "final":
            raise RegistryError(NOT_FOUND, f"path: {artifact_dir} has no {MANIFEST_NAME}")
        manifest_path = write_run_manifest(artifact_dir.parent, role=role, version=version or "0.1.0", name=name)
    manifest = load_manifest(manifest_path)
    overrides = {k: v for k, v in (("role", role), ("version", version), ("name", name)) if v}
    if overrides:
        manifest = parse_manifest({**manifest.to_dict(), **overrides})
    return reg.register(artifact_dir, manifest, actor)


def require_finite_weights(artifact_dir: Path) -> None:
    """Refuse a diverged run's adapter at the door: its hashes match, its numbers are NaN."""
    try:
        report = scan_tree(artifact_dir)
    except TensorFileError as exc:
        raise RegistryError(INVALID_MANIFEST, f"weights: {exc}") from None
    if not report.ok:
        raise RegistryError(
            NON_FINITE,
            f"{artifact_dir}: {len(report.nonfinite)} weight tensor(s) hold NaN or Inf "
            f"(first: {report.nonfinite[0]}); a diverged run is never registered",
            {"tensors": report.nonfinite[:50]},
        )


def summary(m: ArtifactManifest) -> dict[str, Any]:
    return {
        "artifact_id": m.artifact_id,
        "name": m.name,
        "role": m.role,
        "version": m.version,
        "base_model": m.base_model.id,
        "metrics": m.metrics,
        "files": len(m.files),
        "bytes": sum(f.size for f in m.files.values()),
    }


def releases_view(reg: Registry, role: str | None = None) -> dict[str, Any]:
    roles = sorted({r["role"] for r in reg.artifacts()} | ({role} if role else set()))
    if role:
        roles = [role]
    return {
        "aliases": {r: reg.aliases(r) for r in roles},
        "releases": reg.releases(role),
    }


def check_role(role: str | None) -> str | None:
    from uff_port.registry.manifest import ROLES

    if role is not None and role not in ROLES:
        raise RegistryError(INVALID_MANIFEST, f"role: unknown {role!r}; expected one of {', '.join(ROLES)}")
    return role
