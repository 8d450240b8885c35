"""Platform presets: the GPUs a Kaggle session or SageMaker instance really has, for the planner.

`uff-port plan --platform kaggle-t4x2` plans for that hardware (memory per GPU,
count), then adds what the GPU itself decides: fp16 with loss scaling where
there is no bf16 (T4, V100), no FlashAttention before Ampere, the strategy and
cloud keys that select the platform, and an estimate of hours per epoch of the
users' corpus from the GPU's dense fp16 throughput at a modest utilisation.
The throughput figures are datasheet numbers times an assumed utilisation:
estimates to choose a platform with, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final


@dataclass(frozen=True)
class PlatformPreset:
    name: str
    backend: str
    """The strategy that runs there (kaggle | sagemaker)."""
    offer: str
    """The session type or instance to ask for."""
    gpus: str
    """COUNTxSIZE as `uff-port plan --gpus` takes it (usable memory per GPU)."""
    gpu: str
    bf16: bool
    flash_attention: bool
    tflops: float
    """Dense fp16/bf16 tensor TFLOPS per GPU (datasheet)."""
    utilisation: float = 0.3
    cloud: dict[str, Any] = field(default_factory=dict)
    note: str = ""


PLATFORMS: Final = {
    p.name: p
    for p in (
        PlatformPreset("kaggle-t4x2", "kaggle", "Kaggle notebook, accelerator GPU T4 x2 (NvidiaTeslaT4)", "2x15GiB",
                       "Tesla T4", False, False, 65.0, 0.25, {"kaggle": {"accelerator": "NvidiaTeslaT4"}},
                       "30 GPU-hours a week, sessions of at most 12 h (9 h by default); the P100 is retired"),
        PlatformPreset("sagemaker-g5.xlarge", "sagemaker", "ml.g5.xlarge (1x A10G 24 GB)", "1x22GiB", "A10G", True, True,
                       70.0, 0.35, {"sagemaker": {"instance_type": "ml.g5.xlarge"}}),
        PlatformPreset("sagemaker-g4dn.xlarge", "sagemaker", "ml.g4dn.xlarge (1x T4 16 GB)", "1x15GiB", "Tesla T4", False,
                       False, 65.0, 0.25, {"sagemaker": {"instance_type": "ml.g4dn.xlarge"}}),
        PlatformPreset("sagemaker-p3.2xlarge", "sagemaker", "ml.p3.2xlarge (1x V100 16 GB)", "1x15GiB", "Tesla V100",
                       False, False, 125.0, 0.3, {"sagemaker": {"instance_type": "ml.p3.2xlarge"}}),
    )
}

LEARNING_RATES: Final = {"lora": 2e-4, "qlora": 1e-4, "full": 2e-5}
"""Starting points per method at the planner's global batch (QLoRA's 4-bit base wants a gentler step)."""


def hours_per_epoch(preset: PlatformPreset, n_params: int, tokens: int, method: str, grad_ckpt: bool, nproc: int) -> float:
    """FLOPs per token: forward 2N + backward through activations 2N (+2N recomputed with checkpointing;
    full fine-tuning adds 2N of weight gradients); QLoRA pays ~30% for dequantisation."""
    per_token = 4 * n_params + (2 * n_params if grad_ckpt else 0) + (2 * n_params if method == "full" else 0)
    if method == "qlora":
        per_token = int(per_token * 1.3)
    rate = preset.tflops * 1e12 * preset.utilisation * max(1, nproc)
    return tokens * per_token / rate / 3600.0


def platform_advice(
    preset: PlatformPreset, result: dict[str, Any], corpus_tokens: int | None, attn: str = "sdpa"
) -> dict[str, Any]:
    """What the plan adds for a platform: overrides that select it and an epoch estimate."""
    best = result.get("recommended")
    out: dict[str, Any] = {"platform": preset.name, "offer": preset.offer, "gpu": preset.gpu, "bf16": preset.bf16,
                           "flash_attention": preset.flash_attention, "note": preset.note, "fits": best is not None}
    if best is None:
        return out
    overrides = {
        "strategy": preset.backend,
        "training.precision": "bf16" if preset.bf16 else "fp16",
        "training.learning_rate": LEARNING_RATES.get(best["method"], 2e-4),
        # FlashAttention only where the GPU has it and it was asked for (the image must ship flash-attn).
        "model.attn_implementation": "flash_attention_2" if preset.flash_attention and attn == "flash_attention_2" else "sdpa",
    }
    for section, values in preset.cloud.items():
        for key, value in values.items():
            overrides[f"cloud.{section}.{key}"] = value
    out["overrides"] = overrides
    if corpus_tokens:
        out["corpus_tokens"] = corpus_tokens
        out["hours_per_epoch"] = round(hours_per_epoch(preset, int(result["model"]["n_params"]), corpus_tokens,
                                                       best["method"], bool(best["gradient_checkpointing"]),
                                                       int(best["nproc"])), 2)
    return out
