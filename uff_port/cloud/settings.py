"""The `cloud:` map of a training config, validated by this plane.

The training schema keeps `cloud` as an opaque map so that the trainer never
depends on provider settings; this module gives it a schema with the same
error style (every problem at once, by dotted path: `cloud.kaggle.session_hours:
must be <= 12`).
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uff_port.core.config import ConfigError, friendly_error

HOUR: Final = 3600.0
KAGGLE_MAX_SESSION_HOURS: Final = 12.0
SAGEMAKER_GRACE_SECONDS: Final = 120.0
"""SageMaker sends SIGTERM, then kills 120 s later."""
RETIRED_ACCELERATORS: Final = {
    "nvidiateslap100": "Kaggle runs such sessions on NvidiaTeslaT4 instead",
    "tpuv38": "Kaggle runs such sessions on TpuV5E8 instead",
}
"""Shapes the kaggle 2.x client warns are retired: the session would silently run on another."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetSettings(_Section):
    kaggle_hours_per_week: float = Field(30.0, ge=0)
    sagemaker_hours_per_day: float = Field(4.0, ge=0)
    week_starts: Literal["monday", "saturday", "sunday"] = "monday"
    """When the weekly Kaggle quota resets (00:00 UTC of that day)."""
    min_session_minutes: float = Field(15.0, gt=0)
    """A session shorter than this is not worth its start-up cost: wait instead."""


class KaggleSettings(_Section):
    username: str | None = None
    """Owner of the dataset and kernel; defaults to the one in kaggle.json."""
    dataset_slug: str = Field("uff-port-data", pattern=r"^[a-z0-9][a-z0-9-]{2,49}$")
    kernel_slug: str = Field("uff-port-train", pattern=r"^[a-z0-9][a-z0-9-]{2,49}$")
    session_hours: float = Field(9.0, gt=0, le=KAGGLE_MAX_SESSION_HOURS)
    accelerator: str = "NvidiaTeslaT4"
    """Kaggle's machine shape, passed as `kernels_push(acc=...)` and `machine_shape` (T4 sessions get two T4s)."""
    max_sessions: int = Field(20, gt=0)
    max_concurrent_sessions: int = Field(1, gt=0)
    """Sessions of this backend at once across the runs sharing a ledger (the planner assumes 1)."""
    internet: bool = False
    """Sessions run offline unless asked: the base weights come from `model_source` or a weights dataset."""
    model_source: str | None = Field(None, pattern=r"^[^/\s]+/[^/\s]+/[^/\s]+/[^/\s]+/[0-9]+$")
    """Kaggle Model instance version holding the base weights: owner/model/framework/variation/version."""
    hf_token_secret: str | None = None
    """Name of a Kaggle secret holding a Hugging Face token (only with `internet: true`)."""
    extra_dataset_sources: list[str] = Field(default_factory=list)


class SageMakerSettings(_Section):
    region: str | None = None
    bucket: str | None = None
    prefix: str = "uff-port"
    role_arn: str | None = None
    image_uri: str | None = None
    instance_type: str = "ml.g5.xlarge"
    use_spot: bool = True
    max_runtime_seconds: int = Field(4 * 3600, gt=0, le=28 * 24 * 3600)
    max_wait_seconds: int | None = Field(None, gt=0)
    """Spot only: must be >= max_runtime_seconds; default 2x max_runtime_seconds."""
    max_sessions: int = Field(20, gt=0)
    max_concurrent_sessions: int = Field(1, gt=0)
    """Training jobs at once across the runs sharing a ledger (the account's instance quota; the planner assumes 1)."""
    instance_count: int = Field(1, gt=0, le=64)
    """ResourceConfig.InstanceCount: > 1 runs the trainer under torchrun across the instances."""
    model_s3_uri: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
    """Base weights already on S3 (an `s3://` prefix), handed to the job as the `model` channel."""
    network_isolation: bool = False
    """EnableNetworkIsolation: the container reaches nothing; the weights must come from S3."""
    kms_key_id: str | None = None
    """KMS key for S3 uploads (SSE-KMS), the output (KmsKeyId) and the instance volume (VolumeKmsKeyId)."""
    subnets: list[str] = Field(default_factory=list)
    security_group_ids: list[str] = Field(default_factory=list)
    """VpcConfig: both or neither."""


class EncryptionSettings(_Section):
    enabled: bool = False
    """Seal the corpus with AES-256-GCM before it leaves this machine (needs `cryptography`)."""
    key_env: str = "UFF_PORT_CORPUS_KEY"
    """Environment variable holding the key here: 32 bytes, base64 (never in the config)."""
    kaggle_secret: str = "uff-port-corpus-key"
    """Kaggle secret (Add-ons > Secrets) holding the same key, read inside the kernel."""
    sagemaker_secret_id: str | None = None
    """Secrets Manager secret (id or ARN) holding the same key, read inside the job (not under network isolation)."""


class PollSettings(_Section):
    interval_seconds: float = Field(30.0, gt=0)
    max_backoff_seconds: float = Field(600.0, gt=0)
    pull_retries: int = Field(3, ge=0)


class CloudSettings(_Section):
    budgets: BudgetSettings = Field(default_factory=lambda: BudgetSettings.model_validate({}))
    kaggle: KaggleSettings = Field(default_factory=lambda: KaggleSettings.model_validate({}))
    sagemaker: SageMakerSettings = Field(default_factory=lambda: SageMakerSettings.model_validate({}))
    poll: PollSettings = Field(default_factory=lambda: PollSettings.model_validate({}))
    encryption: EncryptionSettings = Field(default_factory=lambda: EncryptionSettings.model_validate({}))
    safety_margin_seconds: float = Field(600.0, ge=0)
    """Stop training this long before a session's budget ends (pull + upload time)."""
    estimate_hours: float | None = Field(None, gt=0)
    """Expected GPU-hours of the whole job, for routing and plan-week."""
    ledger_path: str | None = None
    """Quota ledger file; default `<runs root>/.cloud-ledger.jsonl`."""
    local_gpu: Literal["auto", "yes", "no"] = "auto"
    """Hybrid routing prefers a local GPU; `auto` asks NVML."""


def validate_cloud(raw: Any) -> CloudSettings:
    """Validate a config's `cloud:` map; raise ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"cloud: must be a map, got {type(raw).__name__}"])
    try:
        settings = CloudSettings.model_validate(raw)
    except ValidationError as exc:
        problems = [
            "cloud." + ".".join(str(p) for p in e["loc"]) + f": {friendly_error(e)}" for e in exc.errors()
        ]
        raise ConfigError(problems) from None
    sm = settings.sagemaker
    if sm.use_spot and sm.max_wait_seconds is not None and sm.max_wait_seconds < sm.max_runtime_seconds:
        raise ConfigError(
            ["cloud.sagemaker.max_wait_seconds: must be >= cloud.sagemaker.max_runtime_seconds"]
        )
    problems = []
    if settings.kaggle.accelerator.lower() in RETIRED_ACCELERATORS:
        problems.append(
            f"cloud.kaggle.accelerator: {settings.kaggle.accelerator} is retired "
            f"({RETIRED_ACCELERATORS[settings.kaggle.accelerator.lower()]}); use NvidiaTeslaT4"
        )
    if settings.kaggle.hf_token_secret and not settings.kaggle.internet:
        problems.append("cloud.kaggle.hf_token_secret: only used with cloud.kaggle.internet: true")
    if bool(sm.subnets) != bool(sm.security_group_ids):
        problems.append("cloud.sagemaker.subnets: VpcConfig needs both subnets and security_group_ids")
    if problems:
        raise ConfigError(problems)
    return settings


def aws_region(settings: SageMakerSettings) -> str | None:
    """The region boto3 would use: the config's, else AWS_REGION / AWS_DEFAULT_REGION."""
    import os

    return settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def check_for_strategy(settings: CloudSettings, strategy: str) -> None:
    """What a backend needs, checked when `train` is received (before anything is accepted)."""
    if strategy not in ("sagemaker", "hybrid"):
        return
    sm = settings.sagemaker
    problems = [f"cloud.sagemaker.{k}: required for the sagemaker backend" for k in ("bucket", "role_arn", "image_uri")
                if not getattr(sm, k)]
    if aws_region(sm) is None:
        problems.append("cloud.sagemaker.region: required for the sagemaker backend (or set AWS_REGION)")
    if problems and strategy == "sagemaker":
        raise ConfigError(problems)


def backend_settings(settings: CloudSettings, backend: str) -> KaggleSettings | SageMakerSettings:
    """The section of one cloud backend (its session limits)."""
    if backend == "kaggle":
        return settings.kaggle
    if backend == "sagemaker":
        return settings.sagemaker
    raise ValueError(f"unknown cloud backend {backend!r}")


def session_budget_seconds(settings: CloudSettings, backend: str) -> float:
    """Wall-clock seconds one remote session may run before the provider cuts it."""
    if backend == "kaggle":
        return settings.kaggle.session_hours * HOUR
    if backend == "sagemaker":
        return float(settings.sagemaker.max_runtime_seconds)
    raise ValueError(f"no session budget for backend {backend!r}")
