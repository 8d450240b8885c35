"""The final export: the adapter (and, if asked, the merged model) to RUN_DIR/final."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uff_port.core import layout
from uff_port.core.config import Config
from uff_port.fsutil import atomic_write_json, atomic_write_text, fsync_tree, replace_dir
from uff_port.hashing import canonical_json, canonicalize_json_files, tree_manifest


def save_final(run_dir: Path, model: Any, tokenizer: Any, cfg: Config, *, step: int, meta: dict[str, Any],
               emit: Callable[..., None]) -> Path:
    """Write the export beside `final/` and commit it by one rename; `meta` goes into its manifest.

    With `output.merge` the adapters are merged into `model` in place: do not train it afterwards.
    """
    final = run_dir / layout.FINAL
    tmp = run_dir / f".final-{os.getpid()}"
    if tmp.is_symlink():  # planted: rmtree refuses links, and we must not write through it
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    peft_cfg = getattr(model, "peft_config", {}).get("default")
    if peft_cfg is not None:
        # Record the configured id, not this machine's cache path: the same training on
        # two sites must give the same adapter files (and so the same artifact id).
        peft_cfg.base_model_name_or_path = cfg.model.name_or_path
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if cfg.output.merge and hasattr(model, "merge_and_unload"):
        # The export is the model's last use (the adapter is saved above), so the merge
        # happens in place: a copy would double peak memory (+5.4 GB for 1.3B in fp32).
        save_model_files(model.merge_and_unload(), tokenizer, tmp / "merged")
    # peft writes target_modules in set (hash) order: one byte form for every JSON file we
    # export, so the same weights and config give the same artifact id on every run.
    canonicalize_json_files(tmp)
    atomic_write_text(
        tmp / layout.MANIFEST,
        canonical_json({
            "step": step,
            "base_model": cfg.model.name_or_path,
            **{k: meta[k] for k in ("config_hash", "tokenizer_hash", "versions")},
            "files": tree_manifest(tmp, exclude=[layout.MANIFEST]),
        }),
    )
    fsync_tree(tmp)  # every file of the export, before the rename makes it `final`
    replace_dir(tmp, final)
    emit("log", level="info", message=f"final adapter saved to {final}", path=str(final))
    return final


def finished_export(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """The manifest of `final/` when it already is this config's finished export, else None.

    True when `final/` was exported at `training.max_steps` (or later) by the same
    config (config_hash) and every file still matches its manifest: training again
    would only rewrite it, so the run is reported finished and `final/` left as is.
    """
    import json

    from uff_port.core.config import config_hash
    from uff_port.fsutil import UnsafePath, open_confined
    from uff_port.hashing import verify_tree

    final = run_dir / layout.FINAL
    try:
        with open_confined(run_dir, final / layout.MANIFEST, "rb") as fh:
            manifest = json.loads(fh.read(1 << 24))
        if not isinstance(manifest, dict):
            return None
        step = int(manifest.get("step", -1))
        # With num_epochs, max_steps comes from the corpus; the same config_hash means the same target.
        short = cfg.training.num_epochs is None and step < cfg.training.max_steps
        if short or manifest.get("config_hash") != config_hash(cfg):
            return None
        if final.is_symlink() or not verify_tree(final, manifest["files"], exclude=[layout.MANIFEST, "artifact.json"]).ok:
            return None
    except (OSError, UnsafePath, ValueError, TypeError, KeyError):
        return None
    return manifest


def save_model_files(model: Any, tokenizer: Any, dest: Path) -> None:
    """A full model as transformers and vLLM load it: safetensors shards, config.json, tokenizer."""
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def save_merged(peft_model: Any, tokenizer: Any, out: Path, *, meta: dict[str, Any]) -> Path:
    """Fold the adapter into the base weights and commit `out` by one rename.

    `out/manifest.json` holds `meta` (base model, adapter and its id) and the
    sha256 of every file, so a deployment can verify what it serves. `out` must
    not exist yet: a merge never writes over a directory it did not make.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"--out: {out} already exists; pick a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
        save_model_files(merged, tokenizer, tmp)
        atomic_write_json(tmp / layout.MANIFEST, {"kind": "merged", **meta,
                                                  "files": tree_manifest(tmp, exclude=[layout.MANIFEST])})
        fsync_tree(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
