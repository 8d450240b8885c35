"""Model and tokenizer loading: one path for the tiny model, a local checkout and a hub id.

LoRA via peft, QLoRA (NF4 + double quantisation) via bitsandbytes (imported
only there; CUDA, or CPU with bitsandbytes >= 0.50), gradient checkpointing,
SDPA attention, and the precision policy: bf16 where the device supports it,
else fp16 with a GradScaler (Kaggle's T4), fp32 on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from uff_port.core.config import Config
from uff_port.protocol.errors import ErrorCode
from uff_port.training.builtin import resolve_model_path

MODEL_NOT_FOUND: Final = ErrorCode.MODEL_NOT_FOUND
WEIGHT_FILES: Final = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Precision:
    """What the loop does with dtypes: autocast dtype (None = fp32) and whether to scale."""

    autocast: torch.dtype | None
    use_scaler: bool
    name: str


def pick_device(cfg: Config) -> torch.device:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ModelError(ErrorCode.NOT_AVAILABLE, "no CUDA device: training.device 'cuda' was asked for but no "
                         "CUDA device is visible")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local)


def pick_precision(cfg: Config, device: torch.device) -> Precision:
    want = cfg.training.precision
    if device.type != "cuda":
        if want == "fp16":
            raise ModelError(ErrorCode.INVALID_CONFIG, "training.precision: fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        if want == "bf16":
            return Precision(torch.bfloat16, False, "bf16")
        return Precision(None, False, "fp32")
    bf16_ok = torch.cuda.is_bf16_supported()
    if want == "bf16" and not bf16_ok:
        raise ModelError(ErrorCode.INVALID_CONFIG, "training.precision: this GPU has no bf16; use fp16 (with loss scaling) or auto")
    if want == "fp32":
        return Precision(None, False, "fp32")
    if want == "bf16" or (want == "auto" and bf16_ok):
        return Precision(torch.bfloat16, False, "bf16")
    return Precision(torch.float16, True, "fp16")


def _check_local(path: str, local_only: bool) -> None:
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ModelError(MODEL_NOT_FOUND, f"model.name_or_path: no model directory at {str(p)!r}")
        if not any((p / w).exists() for w in WEIGHT_FILES):
            raise ModelError(
                MODEL_NOT_FOUND,
                f"model.name_or_path: {str(p)!r} has no weights (expected one of {list(WEIGHT_FILES)})",
            )


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.model.name_or_path)
    _check_local(path, cfg.model.local_files_only)
    try:
        tok = AutoTokenizer.from_pretrained(
            path,
            revision=cfg.model.revision,
            local_files_only=cfg.model.local_files_only,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as exc:
        raise ModelError(MODEL_NOT_FOUND, f"model.name_or_path: cannot load a tokenizer from {path!r}: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # Llama checkouts ship without a pad token
    return tok


def tokenizer_hash(tok: Any) -> str:
    """Stable id of the vocabulary: a checkpoint only resumes with the same one."""
    import hashlib
    import json

    vocab = tok.get_vocab()
    blob = json.dumps(sorted(vocab.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def require_nf4(device: torch.device) -> None:
    """QLoRA needs bitsandbytes with 4-bit kernels for `device`: say which part is missing.

    bitsandbytes >= 0.50 ships a CPU backend, so nf4 also trains (slowly) on CPU; older
    releases, or a build without a backend for this device, stop here with `not_available`.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # ImportError, or a broken native library raising anything
        raise ModelError(
            ErrorCode.NOT_AVAILABLE,
            f"quantization.mode: nf4 (QLoRA) needs the bitsandbytes package, which cannot be imported "
            f"here ({type(exc).__name__}: {exc}); install it (pip install 'uff-port[gpu]') or set "
            "quantization.mode: none",
        ) from None
    try:  # one 4-bit round trip on the device: what every quantized Linear does
        w = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
    except Exception as exc:
        raise ModelError(
            ErrorCode.NOT_AVAILABLE,
            f"quantization.mode: nf4 (QLoRA): bitsandbytes {getattr(bnb, '__version__', '?')} has no working "
            f"4-bit kernels for {device.type} here ({type(exc).__name__}: {exc}); use a CUDA device, "
            "bitsandbytes >= 0.50 for CPU, or quantization.mode: none",
        ) from None


def load_model(cfg: Config, device: torch.device, precision: Precision) -> Any:
    """Base model (optionally 4-bit) with LoRA adapters on it, on `device`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.model.name_or_path)
    _check_local(path, cfg.model.local_files_only)
    kwargs: dict[str, Any] = {
        "revision": cfg.model.revision,
        "local_files_only": cfg.model.local_files_only,
        "trust_remote_code": cfg.model.trust_remote_code,
        "attn_implementation": cfg.model.attn_implementation,
    }
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype)
    if dtype is None:
        # Frozen base weights in the compute dtype halve memory; LoRA weights stay fp32 below.
        dtype = precision.autocast or torch.float32
    kwargs["dtype"] = dtype
    if cfg.quantization.mode == "nf4":
        require_nf4(device)
        from transformers import BitsAndBytesConfig  # bitsandbytes is imported by this path only

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.quantization.compute_dtype),
        )
        kwargs["device_map"] = {"": device}
    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(MODEL_NOT_FOUND, f"model.name_or_path: cannot load weights from {path!r}: {exc}") from None
    model.config.use_cache = False  # the KV cache is useless in training and breaks packing masks
    if cfg.quantization.mode == "nf4" and device.type == "cpu":
        # bitsandbytes' CPU inference fast path (eval mode, no grad) repacks each 4-bit
        # weight in place and fails when in_features is not a multiple of its block size
        # (64): evaluation would crash after training. The training path serves both.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if cfg.quantization.mode == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(cfg.model.gradient_checkpointing)
        )
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.model.gradient_checkpointing == "every_other":
        checkpoint_every_other(model)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
        if cfg.model.init_adapter:
            _init_from_adapter(model, cfg.model.init_adapter)
        # Trainable adapter weights in fp32: optimizer updates would vanish in bf16.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.quantization.mode != "nf4":
        model.to(device)
    return model


def checkpoint_every_other(model: Any) -> int:
    """Keep checkpointing on the even decoder layers only; returns how many layers are checkpointed.

    transformers checkpoints each `GradientCheckpointingLayer` whose `gradient_checkpointing`
    is set; the odd ones keep their activations (no recomputation for them).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % 2 == 0
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def _init_from_adapter(model: Any, path: str) -> None:
    """Copy a parent adapter's LoRA weights into the fresh one (same r and targets, or refused)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(ErrorCode.INVALID_CONFIG, f"model.init_adapter: no adapter_model.safetensors in {path!r}")
    state = load_file(str(weights))
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # size mismatch: another r or base model
        raise ModelError(ErrorCode.INVALID_CONFIG, f"model.init_adapter: {path!r} does not fit this LoRA "
                         f"(lora.r and the base model must match the parent's): {str(exc)[:200]}") from None
    expected = {k for k in model.state_dict() if "lora_" in k}
    loaded = {k for k in expected if k not in set(getattr(result, "missing_keys", []) or [])}
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected or not loaded:
        raise ModelError(ErrorCode.INVALID_CONFIG,
                         f"model.init_adapter: {path!r} does not fit this LoRA (lora.r and lora.target_modules "
                         f"must match the parent's): {len(unexpected)} unexpected tensors")


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
