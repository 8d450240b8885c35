"""Completions from a model: batched HF `generate`, left padding, KV cache, stop sequences.

The only module of `uff_port.eval` that imports torch. Targets: a run
directory (its `final/` adapter on the base model it names), an adapter
directory, a base model directory, or `builtin:tiny-llama`. Sampling is
seeded per batch (`seed + batch number`) over a fixed batch order, so the same
call gives the same samples; temperature 0 is greedy and then one sample per
task is generated and repeated n times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port.core import layout
from uff_port.core.config_io import ConfigLimitError, load_yaml_file

STOP_SEQUENCES: Final = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


class TargetError(ValueError):
    """A target that is not a run directory, adapter, model directory or builtin model."""


@dataclass(frozen=True)
class GenConfig:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    stop: tuple[str, ...] = STOP_SEQUENCES
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n: expected >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, batch_size: expected >= 1")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Target:
    model_path: str
    adapter_path: str | None
    name: str

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "base_model": self.model_path, "adapter": self.adapter_path}


def _base_of(adapter_dir: Path, run_dir: Path | None) -> str:
    """The adapter's base: adapter_config.json's path if it exists, else the run config's model."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if base and Path(base).is_dir():
        return str(base)
    if run_dir is not None and (run_dir / layout.CONFIG).is_file():
        try:
            conf = load_yaml_file(run_dir / layout.CONFIG, "config.yaml") or {}
        except ConfigLimitError as exc:
            raise TargetError(exc.problem) from None
        model = conf.get("model") if isinstance(conf, dict) else None
        name = model.get("name_or_path") if isinstance(model, dict) else None
        if name:
            base = name
    if not base:
        raise TargetError(f"{adapter_dir}/adapter_config.json: base_model_name_or_path: missing; "
                          "pass --base-model DIR")
    from uff_port.training.builtin import resolve_model_path

    return resolve_model_path(str(base))


def _registered(ref: str, base_model: str | None) -> Target | None:
    """An artifact of the registry ($UFF_PORT_REGISTRY, else ./registry), if there is one by `ref`."""
    from uff_port.registry.store import Registry, default_root

    root = default_root()
    if not (Path(root) / "registry.db").is_file():
        return None
    from uff_port.registry.bench import resolve_base
    from uff_port.registry.errors import RegistryError

    try:
        with Registry(root) as reg:
            manifest = reg.resolve(ref)
            adapter = reg.artifact_dir(manifest.artifact_id)
    except RegistryError:
        return None
    return Target(resolve_base(manifest.base_model.id, base_model), str(adapter),
                  f"{manifest.role}:{manifest.artifact_id[:12]}")


def resolve_target(target: str, base_model: str | None = None) -> Target:
    """Where the weights are, without loading them."""
    from uff_port.training.builtin import BUILTIN_PREFIX, resolve_model_path

    if target.startswith(BUILTIN_PREFIX):
        try:
            return Target(resolve_model_path(target), None, target)
        except ValueError as exc:
            raise TargetError(f"target: {exc}") from None
    path = Path(target).expanduser()
    if not path.is_dir():
        registered = _registered(target, base_model)
        if registered is not None:
            return registered
        raise TargetError(f"target {target!r}: expected a run directory, adapter or model directory, "
                          "a registered artifact (id, prefix or alias) or builtin:tiny-llama")
    run_dir = None
    adapter = None
    if (path / layout.FINAL / "adapter_config.json").is_file():
        run_dir, adapter = path, path / layout.FINAL
    elif (path / "adapter_config.json").is_file():
        adapter = path
        run_dir = path.parent if (path.parent / layout.CONFIG).is_file() else None
    elif not (path / "config.json").is_file():
        raise TargetError(f"target {target!r}: no final/adapter_config.json, adapter_config.json "
                          "or config.json in it")
    if adapter is None:
        return Target(str(path), None, str(path))
    base = base_model or _base_of(adapter, run_dir)
    return Target(str(base), str(adapter), str(path))


def load(target: Target, device: str = "cpu", dtype: str = "float32",
         safetensors_only: bool = False) -> tuple[Any, Any]:
    """Tokenizer and model (with its adapter); `safetensors_only`: never unpickle any weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if safetensors_only and target.adapter_path and not (Path(target.adapter_path) / "adapter_model.safetensors").is_file():
        raise TargetError(f"{target.adapter_path}: no adapter_model.safetensors (pickled weights are not loaded)")

    tok_src = target.adapter_path if target.adapter_path and any(
        (Path(target.adapter_path) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    ) else target.model_path
    tokenizer = AutoTokenizer.from_pretrained(tok_src, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(target.model_path, local_files_only=True,
                                                      use_safetensors=True if safetensors_only else None,
                                                      dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    if target.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.adapter_path, local_files_only=True)
    model.to(device).eval()
    return model, tokenizer


def truncate(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: GenConfig,
    device: str = "cpu",
    skip: Callable[[int, int], str | None] | None = None,
    on_batch: Callable[[list[tuple[int, int, str]]], None] | None = None,
) -> list[list[str]]:
    """`cfg.n` completions per prompt. `skip(p, i)` returns a completion already made (resume)."""
    import torch

    greedy = cfg.temperature == 0.0
    per_prompt = 1 if greedy else cfg.n
    jobs = [(p, i) for p in range(len(prompts)) for i in range(per_prompt)]
    out: list[list[str | None]] = [[None] * per_prompt for _ in prompts]
    todo = []
    for p, i in jobs:
        have = skip(p, i) if skip else None
        if have is not None:
            out[p][i] = have
        else:
            todo.append((p, i))
    # batches are cut from the full job list, so a resumed run samples each batch alike
    batches = [jobs[j:j + cfg.batch_size] for j in range(0, len(jobs), cfg.batch_size)]
    pending = set(todo)
    for number, batch in enumerate(batches):
        if not any(job in pending for job in batch):
            continue
        enc = tokenizer([prompts[p] for p, _ in batch], return_tensors="pt", padding=True).to(device)
        torch.manual_seed(cfg.seed + number)
        kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "use_cache": True,
                                  "pad_token_id": tokenizer.pad_token_id}
        if greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        if cfg.stop:
            kwargs.update(stop_strings=list(cfg.stop), tokenizer=tokenizer)
        with torch.inference_mode():
            ids = model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        made = []
        for (p, i), text in zip(batch, texts, strict=True):
            comp = truncate(text, cfg.stop)
            if (p, i) in pending:
                out[p][i] = comp
                made.append((p, i, comp))
        if on_batch:
            on_batch(made)
    final = [[c or "" for c in row] for row in out]
    return [row * cfg.n if greedy else row for row in final]
