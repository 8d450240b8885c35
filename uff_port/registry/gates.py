"""Promotion gates, read from YAML: quality, latency, safety, compatibility.

A gate is a pure function of (candidate manifest, baseline manifest, evidence);
the evidence (generation latency, tokens/s, outputs of the prompt suites) is
either measured by `bench.measure` on the artifact or read from a JSON file
measured elsewhere, so gates are testable on constructed metric files and
cheap to re-run. Every gate reports; none short-circuits the others, so the
table shows all reasons at once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from uff_port.core.config_io import ConfigLimitError, load_yaml_file
from uff_port.protocol.errors import ErrorCode
from uff_port.registry.errors import INVALID_GATES, RegistryError
from uff_port.registry.manifest import INTERFACE_CONTRACT, ArtifactManifest

DEFAULT_GATES: Final = Path(__file__).resolve().parents[2] / "configs" / "gates.yaml"
Status = Literal["pass", "fail", "skip"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class QualityGate(_Section):
    enabled: bool = True
    metric: str = "eval_loss"
    higher_is_better: bool = False
    max_regression: float = Field(0.0, ge=0)
    """How much worse than the stable baseline the metric may be (absolute)."""
    threshold: float | None = None
    """Absolute bound that holds even without a baseline (max for losses, min otherwise)."""
    require_metric: bool = True


class LatencyGate(_Section):
    enabled: bool = True
    prompts: list[str] = Field(default_factory=lambda: ["def add(a, b):"], min_length=1)
    max_new_tokens: int = Field(16, gt=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, gt=0)
    max_p95_ms: float = Field(5000.0, gt=0)
    min_tokens_per_s: float = Field(0.0, ge=0)


class SafetyGate(_Section):
    enabled: bool = True
    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(24, gt=0)
    deny_patterns: list[str] = Field(default_factory=list)

    @field_validator("deny_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from None
        return v


class CompatibilityGate(_Section):
    enabled: bool = True
    base_model: str | None = None
    """Pinned base model id; null means 'the current stable release's'."""
    base_revision: str | None = None
    tokenizer_hash: str | None = None
    contract: str = INTERFACE_CONTRACT


class CodeEvalGate(_Section):
    """pass@k on a suite (uff_port.eval.metrics), paired against stable on the same tasks."""

    enabled: bool = False
    suite: str = "humaneval"
    metric: str = "pass@1"
    threshold: float | None = Field(None, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    require_significant: bool = False


class GatesConfig(_Section):
    schema_version: Literal[1] = 1
    quality: QualityGate = Field(default_factory=lambda: QualityGate.model_validate({}))
    latency: LatencyGate = Field(default_factory=lambda: LatencyGate.model_validate({}))
    safety: SafetyGate = Field(default_factory=lambda: SafetyGate.model_validate({}))
    compatibility: CompatibilityGate = Field(default_factory=lambda: CompatibilityGate.model_validate({}))
    code_eval: CodeEvalGate = Field(default_factory=lambda: CodeEvalGate.model_validate({}))


@dataclass(frozen=True)
class GateResult:
    gate: str
    status: Status
    measured: str
    threshold: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evidence:
    """What a benchmark measured on the artifact (or a file says it measured)."""

    latency_p95_ms: float | None = None
    tokens_per_s: float | None = None
    outputs: list[dict[str, str]] | None = None
    source: str = "measured"


def load_gates(path: str | Path | None = None) -> GatesConfig:
    p = Path(path) if path else DEFAULT_GATES
    try:
        raw = load_yaml_file(p, "gates") or {}
        return GatesConfig.model_validate(raw)
    except ConfigLimitError as exc:
        raise RegistryError(INVALID_GATES, exc.problem) from None
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise RegistryError(INVALID_GATES, f"gates {p}: " + "; ".join(problems), {"problems": problems}) from None


def gates_from_map(raw: Any, where: str = "gates_config") -> GatesConfig:
    """A gates config given as a map (a campaign journals the gates it promotes with)."""
    from uff_port.core.config_io import check_tree

    if not isinstance(raw, dict):
        raise RegistryError(INVALID_GATES, f"{where}: expected a map, got {type(raw).__name__}")
    try:
        check_tree(raw)
        return GatesConfig.model_validate(raw)
    except ConfigLimitError as exc:
        raise RegistryError(INVALID_GATES, f"{where}: {exc.problem}") from None
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise RegistryError(INVALID_GATES, f"{where}: " + "; ".join(problems), {"problems": problems}) from None


def load_evidence(path: str | Path) -> Evidence:
    """Read `{"latency_p95_ms", "tokens_per_s", "outputs": [{"prompt", "output"}]}`."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(ErrorCode.INVALID_ARGS, f"bench_results: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise RegistryError(ErrorCode.INVALID_ARGS, "bench_results: expected a JSON object")
    outputs = raw.get("outputs")
    if outputs is not None and not (
        isinstance(outputs, list)
        and all(isinstance(o, dict) and isinstance(o.get("output"), str) for o in outputs)
    ):
        raise RegistryError(ErrorCode.INVALID_ARGS, "bench_results.outputs: expected a list of {prompt, output}")

    def num(key: str) -> float | None:
        v = raw.get(key)
        if v is None:
            return None
        try:
            value = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
        except OverflowError:  # an int beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise RegistryError(ErrorCode.INVALID_ARGS, f"bench_results.{key}: expected a finite number")
        return value

    return Evidence(num("latency_p95_ms"), num("tokens_per_s"), outputs, source=str(path))


def quality_gate(cfg: QualityGate, cand: ArtifactManifest, base: ArtifactManifest | None) -> GateResult:
    if not cfg.enabled:
        return GateResult("quality", "skip", "-", "-", "disabled")
    value = cand.metrics.get(cfg.metric)
    sign = "<=" if not cfg.higher_is_better else ">="
    if value is None:
        status: Status = "fail" if cfg.require_metric else "skip"
        return GateResult("quality", status, "missing", cfg.metric, f"no metrics.{cfg.metric} in the manifest")
    problems = []
    bounds = []
    if cfg.threshold is not None:
        bounds.append(f"{sign} {cfg.threshold:g}")
        worse = value > cfg.threshold if not cfg.higher_is_better else value < cfg.threshold
        if worse:
            problems.append(f"{cfg.metric} {value:.4g} beyond threshold {cfg.threshold:g}")
    ref = base.metrics.get(cfg.metric) if base is not None else None
    if ref is not None:
        limit = ref + cfg.max_regression if not cfg.higher_is_better else ref - cfg.max_regression
        bounds.append(f"{sign} {limit:.4g} (stable {ref:.4g})")
        worse = value > limit if not cfg.higher_is_better else value < limit
        if worse:
            problems.append(f"{cfg.metric} {value:.4g} regresses past stable {ref:.4g} by more than {cfg.max_regression:g}")
    detail = "; ".join(problems) or ("no stable baseline" if base is None else "")
    return GateResult("quality", "fail" if problems else "pass", f"{cfg.metric}={value:.4g}",
                      ", ".join(bounds) or "-", detail)


def latency_gate(cfg: LatencyGate, ev: Evidence | None, optional: bool = False) -> GateResult:
    if not cfg.enabled:
        return GateResult("latency", "skip", "-", "-", "disabled")
    threshold = f"p95 <= {cfg.max_p95_ms:g} ms, >= {cfg.min_tokens_per_s:g} tok/s"
    if ev is None or ev.latency_p95_ms is None or ev.tokens_per_s is None:
        return GateResult("latency", "skip" if optional else "fail", "missing", threshold,
                          "no latency_p95_ms/tokens_per_s measured")
    problems = []
    if ev.latency_p95_ms > cfg.max_p95_ms:
        problems.append(f"p95 {ev.latency_p95_ms:.1f} ms > {cfg.max_p95_ms:g} ms")
    if ev.tokens_per_s < cfg.min_tokens_per_s:
        problems.append(f"{ev.tokens_per_s:.1f} tok/s < {cfg.min_tokens_per_s:g}")
    return GateResult("latency", "fail" if problems else "pass",
                      f"p95 {ev.latency_p95_ms:.1f} ms, {ev.tokens_per_s:.1f} tok/s", threshold,
                      "; ".join(problems))


def safety_gate(cfg: SafetyGate, ev: Evidence | None, optional: bool = False) -> GateResult:
    if not cfg.enabled:
        return GateResult("safety", "skip", "-", "-", "disabled")
    threshold = f"0 of {len(cfg.deny_patterns)} deny patterns"
    outputs = ev.outputs if ev is not None else None
    if outputs is None or (cfg.prompts and not outputs):
        return GateResult("safety", "skip" if optional else "fail", "missing", threshold,
                          "no outputs of the safety prompt suite")
    compiled = [re.compile(p) for p in cfg.deny_patterns]
    hits = [
        f"{o.get('prompt', '?')!r} matched {rx.pattern!r}"
        for o in outputs for rx in compiled if rx.search(o["output"])
    ]
    return GateResult("safety", "fail" if hits else "pass", f"{len(hits)} hits in {len(outputs)} outputs",
                      threshold, "; ".join(hits[:5]))


def compatibility_gate(
    cfg: CompatibilityGate, cand: ArtifactManifest, base: ArtifactManifest | None
) -> GateResult:
    if not cfg.enabled:
        return GateResult("compatibility", "skip", "-", "-", "disabled")
    want_model = cfg.base_model or (base.base_model.id if base else None)
    want_rev = cfg.base_revision or (base.base_model.revision if base else None)
    want_tok = cfg.tokenizer_hash or (base.tokenizer_hash if base else None)
    problems = []
    if want_model is not None and cand.base_model.id != want_model:
        problems.append(f"base_model.id {cand.base_model.id!r} != {want_model!r}")
    if want_rev is not None and cand.base_model.revision != want_rev:
        problems.append(f"base_model.revision {cand.base_model.revision!r} != {want_rev!r}")
    if want_tok is not None and cand.tokenizer_hash != want_tok:
        problems.append(f"tokenizer_hash {str(cand.tokenizer_hash)[:12]} != {want_tok[:12]}")
    if cand.interface.contract != cfg.contract:
        problems.append(f"interface.contract {cand.interface.contract!r} != {cfg.contract!r}")
    if base is not None and cand.interface.task_type != base.interface.task_type:
        problems.append(f"interface.task_type {cand.interface.task_type!r} != {base.interface.task_type!r}")
    threshold = f"{want_model or 'any'} / tokenizer {(want_tok or 'any')[:12]}"
    return GateResult("compatibility", "fail" if problems else "pass",
                      f"{cand.base_model.id} / tokenizer {str(cand.tokenizer_hash)[:12]}", threshold,
                      "; ".join(problems))


def run_gates(
    cfg: GatesConfig,
    cand: ArtifactManifest,
    base: ArtifactManifest | None,
    evidence: Evidence | None,
    optional_evidence: bool = False,
) -> list[GateResult]:
    """The gates in table order (code_eval last, when enabled). `optional_evidence`: missing
    measurements skip, not fail."""
    results = [
        quality_gate(cfg.quality, cand, base),
        latency_gate(cfg.latency, evidence, optional_evidence),
        safety_gate(cfg.safety, evidence, optional_evidence),
        compatibility_gate(cfg.compatibility, cand, base),
    ]
    if cfg.code_eval.enabled:
        from uff_port.eval.metrics import gate

        c = cfg.code_eval
        status, measured, bound, detail = gate(cand.metrics, base.metrics if base else None, c.suite,
                                                c.metric, c.threshold, c.alpha, c.require_significant)
        results.append(GateResult("code_eval", status, measured, bound, detail))  # type: ignore[arg-type]
    return results


def needs_measurement(cfg: GatesConfig) -> bool:
    return cfg.latency.enabled or (cfg.safety.enabled and bool(cfg.safety.prompts))
