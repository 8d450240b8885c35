"""Promote (gates, then one compare-and-swap) and roll back (one compare-and-swap).

Ordering: the artifact is re-hashed first (gates on unverified bytes mean
nothing), then the gates run against the stable release read *before* them,
and the alias move expects that same stable. If another promotion won in the
meantime the move fails with `alias_conflict`: our gates judged a baseline
that is no longer current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port.registry.errors import (
    ALIAS_CONFLICT,
    INVALID_ARGS,
    NOT_FOUND,
    VERIFY_FAILED,
    RegistryError,
)
from uff_port.registry.gates import Evidence, GateResult, GatesConfig, needs_measurement, run_gates
from uff_port.registry.manifest import ArtifactManifest
from uff_port.registry.store import Registry
from uff_port.registry.tensors import TensorFileError, scan_tree

UNSET: Final = object()
PROMOTE_TARGETS: Final = ("stable", "candidate")


@dataclass
class PromotionResult:
    artifact: ArtifactManifest
    target: str
    moved: bool
    gates: list[GateResult] = field(default_factory=list)
    replaced: str | None = None
    audit_seq: int | None = None

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact_id": self.artifact.artifact_id,
            "role": self.artifact.role,
            "version": self.artifact.version,
            "alias": self.target,
            "moved": self.moved,
            "replaced": self.replaced,
            "audit_seq": self.audit_seq,
            "gates": [g.to_dict() for g in self.gates],
        }


def weights_gate(artifact_dir: Path) -> GateResult:
    """Every stored float tensor is finite (an artifact registered before this check, or pulled)."""
    try:
        report = scan_tree(artifact_dir)
    except TensorFileError as exc:
        return GateResult("weights", "fail", "unreadable", "all finite", str(exc))
    measured = f"{report.tensors} tensors in {report.files} files"
    if not report.ok:
        return GateResult("weights", "fail", measured, "all finite",
                          f"NaN/Inf in {len(report.nonfinite)}: " + "; ".join(report.nonfinite[:3]))
    return GateResult("weights", "pass", measured, "all finite")


def promote(
    reg: Registry,
    ref: str,
    gates: GatesConfig,
    *,
    target: str = "stable",
    evidence: Evidence | None = None,
    expect: Any = UNSET,
    base_model: str | None = None,
    device: str = "cpu",
    actor: str = "cli",
) -> PromotionResult:
    """Gate `ref` and move `role:target` to it; refused results come back with moved=False.

    `expect` (an id or None for "unset") makes the caller's own view part of
    the compare-and-swap: promote only if the alias still points there.
    Raises RegistryError(alias_conflict) when it does not.
    """
    if target not in PROMOTE_TARGETS:
        raise RegistryError(INVALID_ARGS, f"to: expected one of {list(PROMOTE_TARGETS)}, got {target!r}")
    cand = reg.resolve(ref)
    role = cand.role
    report = reg.verify(cand.artifact_id)
    if not report.ok:
        gate = GateResult("integrity", "fail", "re-hash", "manifest sha256", report.summary())
        return PromotionResult(cand, target, False, [gate])
    current = reg.aliases(role)
    baseline_id = current.get(target) if expect is UNSET else expect
    if expect is not UNSET and current.get(target) != expect:
        raise RegistryError(
            ALIAS_CONFLICT,
            f"{role}:{target} is {current.get(target)}, not the expected {expect}",
            {"role": role, "alias": target, "expected": expect, "actual": current.get(target)},
        )
    stable_id = current.get("stable")
    baseline = reg.resolve(stable_id) if stable_id else None
    integrity = GateResult("integrity", "pass", f"{len(cand.files)} files", "manifest sha256")
    weights = weights_gate(reg.artifact_dir(cand.artifact_id))
    if not weights.passed:
        return PromotionResult(cand, target, False, [integrity, weights])
    if evidence is None and needs_measurement(gates):
        from uff_port.registry.bench import measure  # loads torch: only when a gate needs it

        evidence = measure(cand, reg.artifact_dir(cand.artifact_id), gates, base_model, device)
    results = [integrity, weights, *run_gates(gates, cand, baseline, evidence)]
    if not all(g.passed for g in results):
        return PromotionResult(cand, target, False, results)
    if baseline_id == cand.artifact_id:
        return PromotionResult(cand, target, False, results, replaced=baseline_id)
    moves: dict[str, str | None] = {target: cand.artifact_id}
    if target == "stable":
        # the old stable becomes `previous` in the same transaction: rollback is always one move away
        if baseline_id is not None:
            moves["previous"] = baseline_id
        if current.get("candidate") == cand.artifact_id:
            moves["candidate"] = None
    note = {"gates": [g.to_dict() for g in results], "evidence": evidence.source if evidence else None}
    seq = reg.move_aliases(role, moves, {target: baseline_id}, "promote", actor, note)
    return PromotionResult(cand, target, True, results, replaced=baseline_id, audit_seq=seq)


def rollback(reg: Registry, role: str = "textgen", actor: str = "cli") -> dict[str, Any]:
    """Swap `stable` and `previous` in one move (a second rollback rolls forward again)."""
    current = reg.aliases(role)
    stable, previous = current.get("stable"), current.get("previous")
    if previous is None:
        raise RegistryError(NOT_FOUND, f"{role}:previous is not set; nothing to roll back to")
    target = reg.resolve(previous)
    report = reg.verify(target.artifact_id)
    if not report.ok:
        raise RegistryError(
            VERIFY_FAILED,
            f"{role}:previous ({target.short_id}) fails verification: {report.summary()}",
            {"artifact_id": target.artifact_id, "verify": report.to_dict()},
        )
    seq = reg.move_aliases(
        role,
        {"stable": previous, "previous": stable},
        {"stable": stable, "previous": previous},
        "rollback",
        actor,
    )
    return {"role": role, "stable": previous, "previous": stable, "version": target.version,
            "audit_seq": seq}
