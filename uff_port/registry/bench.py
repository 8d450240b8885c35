"""The generation benchmark behind the latency and safety gates.

Loads the base model plus the artifact's adapter with transformers/peft and
generates greedily. torch is imported inside `measure` only: importing this
module (or the CLI) stays cheap.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from uff_port.registry.errors import NOT_FOUND, RegistryError
from uff_port.registry.gates import Evidence, GatesConfig
from uff_port.registry.manifest import ArtifactManifest
from uff_port.registry.runmanifest import TOKENIZER_FILES


def p95(samples: list[float]) -> float:
    """Nearest-rank 95th percentile (no interpolation: it is a sample that happened)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def resolve_base(model_id: str, override: str | None = None) -> str:
    """A loadable local path or hub id for the adapter's base model; never downloads."""
    if override:
        return override
    if Path(model_id).is_dir():
        return model_id
    if model_id.startswith("builtin:"):
        from uff_port.training.builtin import resolve_model_path  # builds the tiny model locally

        try:
            return resolve_model_path(model_id)
        except ValueError as exc:
            raise RegistryError(NOT_FOUND, f"base_model.id: {exc}; pass --base-model DIR") from None
    return model_id  # a hub id: loaded with local_files_only, so only from the local cache


def measure(
    manifest: ArtifactManifest,
    artifact_dir: Path,
    gates: GatesConfig,
    base_model: str | None = None,
    device: str = "cpu",
) -> Evidence:
    """Generate the latency prompts (timed) and the safety prompts (collected)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_base(manifest.base_model.id, base_model)
    tok_src = artifact_dir if any((artifact_dir / n).is_file() for n in TOKENIZER_FILES) else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_src, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(
            base, local_files_only=True, revision=manifest.base_model.revision, dtype=torch.float32
        )
        model = PeftModel.from_pretrained(model, str(artifact_dir), local_files_only=True)
    except OSError as exc:
        raise RegistryError(NOT_FOUND, f"base_model.id: cannot load {base!r} locally: {exc}") from None
    model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompt: str, n: int) -> tuple[str, int, float]:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=pad)
        elapsed = time.perf_counter() - start
        new = out[0, enc["input_ids"].shape[1]:]
        return str(tokenizer.decode(new, skip_special_tokens=True)), int(new.numel()), elapsed

    ev = Evidence(source="measured")
    lat = gates.latency
    if lat.enabled:
        for _ in range(lat.warmup):
            generate(lat.prompts[0], lat.max_new_tokens)
        samples, tokens, seconds = [], 0, 0.0
        for _ in range(lat.repeats):
            for prompt in lat.prompts:
                _text, n, dt = generate(prompt, lat.max_new_tokens)
                samples.append(dt * 1000.0)
                tokens += n
                seconds += dt
        ev.latency_p95_ms = p95(samples)
        ev.tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    if gates.safety.enabled:
        ev.outputs = [
            {"prompt": p, "output": generate(p, gates.safety.max_new_tokens)[0]}
            for p in gates.safety.prompts
        ]
    return ev
