"""Built-in assets: the sample corpus and the tiny Llama model built from it.

`builtin:tiny-llama` is built once per cache directory, deterministically, and
then loaded through exactly the same `from_pretrained` path as a real
DeepSeek-Coder checkout, so the default run exercises the real code path
without a download.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import atomic_write_text, fsync_dir

BUILTIN_PREFIX: Final = "builtin:"
SAMPLE_CORPUS: Final = "builtin:sample-corpus"
TINY_LLAMA: Final = "builtin:tiny-llama"
# Bump when the recipe below changes: the cache key changes with it.
_TINY_RECIPE: Final = "tiny-llama/1"
_VOCAB_SIZE: Final = 1024
SPECIAL_TOKENS: Final = ("<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
# Every turn opens with a role marker; an assistant turn ends with EOS. The
# rendering of messages[:i] (with the generation prompt) is a strict prefix of
# messages[:i+1]: data.py relies on that to mask everything but the replies.
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sample_corpus_path() -> Path:
    return Path(str(resources.files("uff_port") / "assets" / "sample_corpus.jsonl"))


def resolve_data_path(path: str) -> Path:
    """`builtin:sample-corpus` or a filesystem path."""
    if path == SAMPLE_CORPUS:
        return sample_corpus_path()
    if path.startswith(BUILTIN_PREFIX):
        raise ValueError(f"unknown builtin data set {path!r}; expected {SAMPLE_CORPUS!r}")
    return Path(path).expanduser()


def cache_dir() -> Path:
    env = os.environ.get("UFF_PORT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "uff-port"


def _tiny_key() -> str:
    h = hashlib.sha256(_TINY_RECIPE.encode())
    h.update(sample_corpus_path().read_bytes())
    return h.hexdigest()[:16]


def resolve_model_path(name_or_path: str) -> str:
    """A builtin model becomes its (built) local directory; anything else is unchanged."""
    if name_or_path == TINY_LLAMA:
        return str(ensure_tiny_llama())
    if name_or_path.startswith(BUILTIN_PREFIX):
        from uff_port.training import real_arch  # real sizes, random weights (built once)

        size = real_arch.size_of(name_or_path)
        if size is not None:
            return str(real_arch.ensure_real_arch(size))
        raise ValueError(
            f"unknown builtin model {name_or_path!r}; expected {TINY_LLAMA!r} or "
            f"{[real_arch.builtin_name(s) for s in real_arch.REAL_CONFIGS]}"
        )
    return name_or_path


def ensure_tiny_llama(root: Path | None = None) -> Path:
    """Build the tiny model once; concurrent callers (DDP ranks, tests) wait on a lock."""
    base = root or cache_dir()
    target = base / f"tiny-llama-{_tiny_key()}"
    # The weights are written last inside the temp dir, so they mark a whole build.
    if (target / "model.safetensors").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".tiny-llama.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "model.safetensors").exists():  # another process built it meanwhile
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete build of an older version
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama.", dir=base))
        try:
            _build_tiny_llama(tmp)
            if not (tmp / "model.safetensors").exists():
                raise RuntimeError(f"building {TINY_LLAMA} wrote no weights into {tmp}")
            # The rename is the commit: a crash before it leaves only a temp dir.
            os.replace(tmp, target)
            fsync_dir(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _corpus_texts() -> list[str]:
    import json

    out = []
    with open(sample_corpus_path(), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if "text" in rec:
                out.append(rec["text"])
            elif "prompt" in rec:
                out.append(rec["prompt"] + rec["completion"])
            else:
                out.extend(m["content"] for m in rec["messages"])
    return out


def train_bpe(vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on the bundled corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_texts(), trainer=trainer)
    return tok


def fast_tokenizer(tok: Any, model_max_length: int) -> Any:
    """`tok` as a transformers tokenizer with our special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = fast_tokenizer(train_bpe(_VOCAB_SIZE), model_max_length=2048)
    fast.save_pretrained(out)

    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    atomic_write_text(out / "BUILT_BY", f"{_TINY_RECIPE}\n")
