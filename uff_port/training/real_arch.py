"""DeepSeek-Coder architectures at their real size, with random weights, built locally once.

No hub download is possible on the machines that test us, yet the code path of a
real-size model (its config with linear RoPE scaling, the 32256-entry vocabulary,
24 or 32 layers, a checkpoint and a merged export of real size) must run. So the
published config.json of deepseek-ai/deepseek-coder-{1.3b,6.7b}-base is written
here verbatim (less the token ids of its tokenizer), the weights are drawn from
the model's own initializer with a fixed seed and saved in bf16 safetensors like
the real repository, and the tokenizer is a byte-level BPE trained on the bundled
corpus and padded with added tokens to exactly the real vocabulary size. The
directory is then loaded through the same `from_pretrained` path as a real
checkout (`model.name_or_path` set to it, or `builtin:deepseek-coder-1.3b-random`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import atomic_write_text, fsync_dir

# config.json of deepseek-ai/deepseek-coder-{size}-base (bos/eos/pad ids are our tokenizer's).
_COMMON: Final[dict[str, Any]] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"factor": 4.0, "type": "linear"},
    "rope_theta": 100000,
    "tie_word_embeddings": False,
    "vocab_size": 32256,
    "attention_bias": False,
    "pretraining_tp": 1,
}
REAL_CONFIGS: Final[dict[str, dict[str, Any]]] = {
    "1.3b": _COMMON | {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "num_key_value_heads": 16},
    "6.7b": _COMMON | {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32},
}  # fmt: skip
REAL_PREFIX: Final = "builtin:deepseek-coder-"
REAL_SUFFIX: Final = "-random"
# Bump when the recipe below changes: the cache key changes with it.
_RECIPE: Final = "deepseek-coder-random/1"
VOCAB_SIZE: Final = 32256
# Trained merges stop where the corpus runs out; the rest of the vocabulary is padding.
_BPE_VOCAB: Final = 16000
_PAD_TOKEN: Final = "<|reserved_{}|>"


def builtin_name(size: str) -> str:
    return f"{REAL_PREFIX}{size}{REAL_SUFFIX}"


def size_of(name: str) -> str | None:
    """`builtin:deepseek-coder-1.3b-random` -> '1.3b'; None for any other name."""
    if name.startswith(REAL_PREFIX) and name.endswith(REAL_SUFFIX):
        size = name[len(REAL_PREFIX) : -len(REAL_SUFFIX)]
        if size in REAL_CONFIGS:
            return size
        raise ValueError(f"unknown builtin model {name!r}; sizes: {sorted(REAL_CONFIGS)}")
    return None


def llama_config(size: str, **token_ids: int) -> Any:
    from transformers import LlamaConfig

    if size not in REAL_CONFIGS:
        raise ValueError(f"unknown DeepSeek-Coder size {size!r}; expected one of {sorted(REAL_CONFIGS)}")
    cfg: dict[str, Any] = {k: v for k, v in REAL_CONFIGS[size].items() if k not in ("architectures", "model_type")}
    return LlamaConfig(**(cfg | token_ids))


def _key(size: str) -> str:
    from uff_port.training.builtin import sample_corpus_path

    h = hashlib.sha256(_RECIPE.encode())
    h.update(json.dumps(REAL_CONFIGS[size], sort_keys=True).encode())
    h.update(sample_corpus_path().read_bytes())
    return h.hexdigest()[:16]


def target_dir(size: str, root: Path | None = None) -> Path:
    from uff_port.training.builtin import cache_dir

    return (root or cache_dir()) / f"deepseek-coder-{size}-random-{_key(size)}"


def _complete(path: Path) -> bool:
    return (path / "BUILT_BY").exists()


def ensure_real_arch(size: str, root: Path | None = None, device: str = "cpu") -> Path:
    """Build once per cache; concurrent callers wait on a lock. `device` only speeds up init."""
    from uff_port.training.builtin import cache_dir

    base = root or cache_dir()
    target = target_dir(size, base)
    if _complete(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".deepseek-coder-{size}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target):
            return target
        shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".deepseek-coder-{size}.", dir=base))
        try:
            build(size, tmp, device=device)
            os.replace(tmp, target)  # the rename commits the build
            fsync_dir(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def build_tokenizer(out: Path | None = None) -> Any:
    """Byte-level BPE on the sample corpus, padded with added tokens to exactly 32256 entries."""
    from tokenizers import AddedToken

    from uff_port.training.builtin import fast_tokenizer, train_bpe

    tok = train_bpe(_BPE_VOCAB)
    missing = VOCAB_SIZE - tok.get_vocab_size(with_added_tokens=True)
    if missing < 0:
        raise RuntimeError(f"the BPE vocabulary overshot {VOCAB_SIZE}: lower _BPE_VOCAB")
    tok.add_special_tokens([AddedToken(_PAD_TOKEN.format(i), special=True) for i in range(missing)])
    fast = fast_tokenizer(tok, model_max_length=16384)
    if len(fast) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(fast)} entries, expected {VOCAB_SIZE}")
    if out is not None:
        fast.save_pretrained(out)
    return fast


def build(size: str, out: Path, device: str = "cpu") -> None:
    """Tokenizer, then bf16 weights from a fixed seed; BUILT_BY is written last (completeness mark)."""
    import torch
    from transformers import LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    cfg = llama_config(size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[torch.device(device)] if device != "cpu" else []):
        torch.manual_seed(0)
        # Built directly in bf16 (the real repository's dtype): no fp32 copy in memory.
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    atomic_write_text(out / "BUILT_BY", f"{_RECIPE}\n")


def meta_model(size: str, lora_r: int | None = None, targets: tuple[str, ...] | None = None) -> Any:
    """The architecture on the meta device (no memory), optionally with peft's LoRA on it."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    model: Any
    with init_empty_weights():
        model = LlamaForCausalLM(llama_config(size))
        if lora_r is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                     target_modules=list(targets or ()), task_type="CAUSAL_LM"))
    return model
