"""The campaign spec: the week's models, their order, budgets, schedule and promotion policy.

Validated here and only here (the Elixir side never parses YAML): strict
pydantic, every problem listed by its dotted path, each model's training
config (preset + overrides) validated as `train` would, the dependency graph
checked for unknown parents and cycles. docs/campaign.md is the reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from uff_port.core.config import ConfigError, friendly_error, load_config_file, validate_config
from uff_port.core.config_io import (
    ConfigLimitError,
    check_tree,
    dotted,
    parse_config_text,
    read_config_bytes,
)

SPEC_SCHEMA: Final = 1
MAX_MODELS: Final = 64
STAGES: Final = ("sft", "rl")
STRATEGIES: Final = ("local", "kaggle", "sagemaker", "hybrid")
BACKENDS: Final = ("local", "kaggle", "sagemaker")
WEEKDAYS: Final = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def _job_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError("expected 1-40 characters of a-z, 0-9, '-' or '_', starting with a letter or digit")
    return value


JobName = Annotated[str, AfterValidator(_job_name)]


class EvalSpec(_Strict):
    """Code-evaluation suites run on the trained adapter (the worker's `eval`)."""

    suites: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list, max_length=16)
    limit: int | None = Field(default=None, ge=1, le=100_000)
    n: int = Field(default=1, ge=1, le=100)
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    timeout: float = Field(default=10.0, gt=0, le=3600)


class RLStageSpec(_Strict):
    """The `rl` stage of a model: a GRPO config started from the model's SFT result."""

    preset: Annotated[str, Field(min_length=1, max_length=500)]
    """An RL training config (`stage: rl`): a preset name (`rl-tiny`) or a YAML path."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides of the RL config (the campaign's `overrides` are the SFT stage's only)."""


class ModelSpec(_Strict):
    name: JobName
    role: str | None = None
    """Registry role; default: the name when it is a role (ufm, ...), else textgen."""
    preset: Annotated[str, Field(min_length=1, max_length=500)]
    """A training config: a preset name (`tiny`, `adapter-ufm`) or a YAML path."""
    data: str | list[Annotated[str, Field(min_length=1)]] | None = None
    stages: list[Literal["sft", "rl"]] = Field(default_factory=lambda: ["sft"], min_length=1,  # type: ignore[arg-type]
                                               max_length=2)
    parent: JobName | None = None
    """Another model of this campaign: this one starts from its newest promoted adapter."""
    strategy: Literal["local", "kaggle", "sagemaker", "hybrid"] | None = None
    hours: float = Field(default=4.0, gt=0, le=1000)
    """Estimated GPU-hours (placement and budget accounting)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    rl: RLStageSpec | None = None
    """The RL stage's config; required when `stages` has `rl`."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    gates: str | None = None
    """A gates YAML for this model's promotion (default: the campaign's)."""

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if v[0] != "sft" or len(set(v)) != len(v):
            raise ValueError("expected [sft] or [sft, rl]")
        return v


class BudgetSpec(_Strict):
    local_gpus: int = Field(default=1, ge=0, le=16)
    """GPUs of this machine: one local job per GPU at a time."""
    kaggle_hours_per_week: float = Field(default=30.0, ge=0, le=168)
    sagemaker_hours_per_day: float = Field(default=4.0, ge=0, le=24)


class ScheduleSpec(_Strict):
    mode: Literal["asap", "daily", "weekly"] = "asap"
    hour: int = Field(default=0, ge=0, le=23)
    """UTC hour the daily cycle starts / the weekly promotion window opens."""
    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] = "sunday"
    window_hours: float = Field(default=24.0, gt=0, le=168)


class PromotionSpec(_Strict):
    policy: Literal["auto", "candidate"] = "auto"
    """auto: promote to stable through the gates; candidate: move only the candidate alias."""
    gates: str | None = None
    keep_releases: int = Field(default=3, ge=1, le=100)
    """Fused releases kept on disk: the new one and the previous ones for rollback."""


class ReleaseSpec(_Strict):
    enabled: bool = True
    version: str | None = Field(default=None, pattern=r"^\d+\.\d+\.\d+$")


class CampaignSpec(_Strict):
    schema_version: Literal[1] = 1
    name: JobName
    strategy: Literal["local", "kaggle", "sagemaker", "hybrid"] = "hybrid"
    """Default strategy of every model without its own."""
    models: list[ModelSpec] = Field(min_length=1, max_length=MAX_MODELS)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    release: ReleaseSpec = Field(default_factory=ReleaseSpec)
    cloud: dict[str, Any] = Field(default_factory=dict)
    """The `cloud:` config map given to every cloud job (docs/cloud.md)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted-key overrides applied to every model before its own."""

    def role_of(self, m: ModelSpec) -> str:
        from uff_port.registry.manifest import ROLES

        if m.role:
            return m.role
        return m.name if m.name in ROLES else "textgen"

    def strategy_of(self, m: ModelSpec) -> str:
        return m.strategy or self.strategy


class SpecError(ConfigError):
    """Every problem of a spec, as 'dotted.path: message' strings."""


def _graph_problems(spec: CampaignSpec) -> list[str]:
    from uff_port.registry.manifest import ROLES

    problems: list[str] = []
    index = {m.name: i for i, m in enumerate(spec.models)}
    seen: dict[str, int] = {}
    roles: dict[str, int] = {}
    for i, m in enumerate(spec.models):
        if m.name in seen:
            problems.append(f"models.{i}.name: {m.name!r} is also models.{seen[m.name]}")
        seen.setdefault(m.name, i)
        role = spec.role_of(m)
        if role not in ROLES:
            problems.append(f"models.{i}.role: unknown {role!r}; expected one of {', '.join(ROLES)}")
        elif role in roles:
            problems.append(f"models.{i}.role: {role!r} is also models.{roles[role]}'s (one artifact per role in a release)")
        roles.setdefault(role, i)
        if "rl" in m.stages and m.rl is None:
            problems.append(f"models.{i}.rl: required by stages [sft, rl] (rl: {{preset: rl-tiny}}: "
                            "an RL config with stage: rl; it starts from this model's SFT result)")
        if m.rl is not None and "rl" not in m.stages:
            problems.append(f"models.{i}.rl: given, but stages has no rl (stages: [sft, rl])")
        if m.parent is not None:
            if m.parent not in index:
                problems.append(f"models.{i}.parent: {m.parent!r} is not a model of this campaign")
            elif m.parent == m.name:
                problems.append(f"models.{i}.parent: a model cannot be its own parent")
    if problems:
        return problems
    for i, m in enumerate(spec.models):  # cycles: follow parents; at most len(models) hops
        cur, hops = m.parent, 0
        while cur is not None and hops <= len(spec.models):
            if cur == m.name:
                problems.append(f"models.{i}.parent: a cycle through {m.name!r}")
                break
            cur, hops = spec.models[index[cur]].parent, hops + 1
    return problems


def _config_problems(spec: CampaignSpec, base: Path | None) -> list[str]:
    problems: list[str] = []
    for i, m in enumerate(spec.models):
        sft = _stage_config(m.preset, job_overrides(spec, m), base, f"models.{i}", problems)
        if m.rl is None or "rl" not in m.stages:
            continue
        rl = _stage_config(m.rl.preset, rl_overrides(spec, m), base, f"models.{i}.rl", problems)
        if sft is None or rl is None:
            continue
        where = f"models.{i}.rl"
        if rl.stage != "rl":
            problems.append(f"{where}.preset: {m.rl.preset!r} is a {rl.stage} config; the rl stage needs stage: rl")
        # The RL adapter starts from the SFT one (model.init_adapter): same base and LoRA shape.
        if rl.model.name_or_path != sft.model.name_or_path:
            problems.append(f"{where}.model.name_or_path: {rl.model.name_or_path!r} is not the sft stage's "
                            f"{sft.model.name_or_path!r} (the RL adapter starts from the SFT one)")
        if rl.lora.r != sft.lora.r or sorted(rl.lora.target_modules or []) != sorted(sft.lora.target_modules or []):
            problems.append(f"{where}.lora: r {rl.lora.r} on {rl.lora.target_modules} does not match the sft "
                            f"stage's r {sft.lora.r} on {sft.lora.target_modules} (the RL adapter starts from the SFT one)")
    return problems


def _stage_config(preset: str, overrides: dict[str, Any], base: Path | None, where: str,
                  problems: list[str]) -> Any:
    if base is not None and not Path(preset).is_absolute() and (base / preset).exists():
        preset = str(base / preset)
    try:
        return validate_config(load_config_file(preset), overrides)
    except ConfigError as exc:
        problems += [f"{where}.{p}" if not p.startswith("config_path") else f"{where}.preset{p[11:]}"
                     for p in exc.problems]
        return None


def job_overrides(spec: CampaignSpec, m: ModelSpec) -> dict[str, Any]:
    """The dotted overrides `train` gets for model `m` (campaign's, then the model's own)."""
    out: dict[str, Any] = {**spec.overrides, **m.overrides}
    if m.data is not None:
        out["data.path"] = m.data
    strategy = spec.strategy_of(m)
    out["strategy"] = strategy
    if strategy != "local" and spec.cloud:
        out["cloud"] = spec.cloud
    return out


def rl_overrides(spec: CampaignSpec, m: ModelSpec) -> dict[str, Any]:
    """The dotted overrides `train` gets for model `m`'s RL stage (its own, on the SFT stage's backend)."""
    assert m.rl is not None
    out: dict[str, Any] = dict(m.rl.overrides)
    strategy = spec.strategy_of(m)
    out["strategy"] = strategy
    if strategy != "local" and spec.cloud:
        out["cloud"] = spec.cloud
    return out


def validate_spec(raw: Any, *, base: Path | None = None, check_configs: bool = True) -> CampaignSpec:
    """Validate a spec tree; raise SpecError listing every problem by path."""
    if not isinstance(raw, dict):
        raise SpecError([f"<root>: a campaign spec must be a map, got {type(raw).__name__}"])
    try:
        check_tree(raw)
    except ConfigLimitError as exc:
        raise SpecError([exc.problem]) from None
    try:
        spec = CampaignSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([f"{dotted(_loc(e['loc']))}: {_message(e)}" for e in exc.errors()]) from None
    problems = _graph_problems(spec)
    if spec.cloud:
        from uff_port.cloud.settings import validate_cloud

        try:
            validate_cloud(spec.cloud)
        except ConfigError as exc:
            problems += exc.problems
    if check_configs and not problems:
        problems += _config_problems(spec, base)
    if problems:
        raise SpecError(problems)
    return spec


def _loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic names union members and validators in the path; the user wrote neither
    out: list[Any] = []
    for part in loc:
        if isinstance(part, str) and (part.startswith(("list[", "str", "function-", "literal[")) or part == "[key]"):
            continue
        out.append(part)
    return tuple(out)


def _message(err: Any) -> str:
    msg = friendly_error(err)
    return msg.removeprefix("Value error, ")


def load_spec(path: str | Path, *, check_configs: bool = True) -> CampaignSpec:
    """Read and validate a spec file (YAML or JSON) within the config reader's limits."""
    p = Path(path)
    try:
        tree = parse_config_text(read_config_bytes(p, field="spec"), name=str(p),
                                 as_json=p.suffix.lower() == ".json", field="spec")
    except ConfigLimitError as exc:
        raise SpecError([exc.problem]) from None
    return validate_spec(tree, base=p.parent, check_configs=check_configs)


def topo_order(spec: CampaignSpec) -> list[ModelSpec]:
    """Models with every parent before its children, otherwise in spec order."""
    done: set[str] = set()
    out: list[ModelSpec] = []
    pending = list(spec.models)
    while pending:
        for m in pending:
            if m.parent is None or m.parent in done:
                out.append(m)
                done.add(m.name)
                pending.remove(m)
                break
        else:  # validate_spec refuses cycles; this only guards direct callers
            raise SpecError([f"models: a cycle among {', '.join(m.name for m in pending)}"])
    return out
