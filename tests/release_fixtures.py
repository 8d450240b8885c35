"""Builders for the deploy/watch/publish tests (no tests here): real tiny-model artifacts per role.

One real training per test process (test_registry_fixtures.trained_run); each
role's artifacts are perturbed copies of it, so every one has its own bytes
and id without paying for more training.
"""

from __future__ import annotations

from pathlib import Path

from test_registry_fixtures import trained_run, variant_run

from uff_port.registry.manifest import ArtifactManifest
from uff_port.registry.service import register_path
from uff_port.registry.store import Registry


def role_artifacts(
    reg: Registry, base: Path, role: str, count: int, *, seed0: int = 0
) -> list[ArtifactManifest]:
    """`count` registered artifacts of `role`, versions 1.0.0, 1.1.0, ... (eval_loss improving)."""
    run = trained_run(base / "train")
    out = []
    for i in range(count):
        seed = seed0 + 1000 + 17 * i + sum(map(ord, role))
        src = variant_run(run, base / f"{role}-{i}", seed=seed, eval_loss=3.0 - 0.01 * i)
        manifest, _ = register_path(reg, src, role=role, version=f"1.{i}.0", name=f"{role}-adapter")
        out.append(manifest)
    return out
