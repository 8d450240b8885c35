"""Base weights where the job runs: which source a session attaches, and how the job finds it.

A Kaggle session runs offline, so the base model must arrive as an input: a
Kaggle Model instance (`cloud.kaggle.model_source`, mounted under
/kaggle/input/<model>/<framework>/<variation>/<version>) or a private dataset
of a local copy, uploaded once and named by its content hash. A SageMaker job
either downloads from the Hub itself or gets an S3 prefix as its `model`
channel (`cloud.sagemaker.model_s3_uri`, or a local copy uploaded once), the
only way under EnableNetworkIsolation.

The plan is made before anything is uploaded: a model that no source can
supply is refused with a message naming exactly what to attach. Inside the
job, `resolve_in_job` maps whichever source arrived onto `model.name_or_path`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from uff_port.cloud.settings import CloudSettings
from uff_port.fsutil import atomic_write_json
from uff_port.hashing import tree_manifest

WEIGHTS_MARKER: Final = "uff-weights.json"
"""At the top of an uploaded weights copy: its content hash, so the job finds the right one."""
MODEL_NOT_FOUND: Final = "model_not_found"
WEIGHT_FILES: Final = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")

Kind = Literal["builtin", "hub", "kaggle_model", "kaggle_dataset", "s3"]


class WeightsError(Exception):
    """No source can bring the base model to the job; the message says what to attach."""

    code = MODEL_NOT_FOUND


@dataclass(frozen=True)
class WeightsPlan:
    kind: Kind
    name: str
    """The config's `model.name_or_path` (what the user asked for)."""
    source: str | None = None
    """Kaggle model handle, dataset slug suffix (the hash) or s3:// prefix."""
    local_dir: str | None = None
    """A local copy to upload once (kaggle_dataset, s3 without model_s3_uri)."""
    content_hash: str | None = None

    def to_meta(self) -> dict[str, Any]:
        """What the bundle tells the job (never a local path)."""
        meta = asdict(self)
        meta.pop("local_dir")
        return meta


def dir_hash(path: Path, cache: Path | None = None) -> str:
    """sha256 over (relative path, sha256) of every file; cached by (size, mtime) so 13 GB is hashed once."""
    stats = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.rglob("*") if p.is_file() and p.name != WEIGHTS_MARKER)
    key = hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()
    memo: dict[str, str] = {}
    if cache is not None and cache.is_file():
        memo = json.loads(cache.read_text(encoding="utf-8"))
        if key in memo:
            return memo[key]
    files = tree_manifest(path, exclude=[WEIGHTS_MARKER])
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{files[rel]['sha256']}  {rel}\n".encode())
    digest = h.hexdigest()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {**memo, key: digest})
    return digest


def _local_model(name: str) -> Path | None:
    p = Path(name).expanduser()
    looks_local = p.is_absolute() or name.startswith((".", "~")) or p.exists()
    return p if looks_local and p.is_dir() else None


def plan_weights(cfg: dict[str, Any], settings: CloudSettings, backend: str, cache: Path | None = None) -> WeightsPlan:
    """Where `backend`'s job gets the base model from; WeightsError if nowhere."""
    name = str((cfg.get("model") or {}).get("name_or_path") or "builtin:tiny-llama")
    if name.startswith("builtin:"):
        return WeightsPlan("builtin", name)  # built inside the job from the bundled wheel
    local = _local_model(name)
    if local is not None and not any((local / w).exists() for w in WEIGHT_FILES):
        raise WeightsError(f"model.name_or_path: {name!r} has no weights (expected one of {list(WEIGHT_FILES)})")
    if backend == "kaggle":
        kg = settings.kaggle
        if kg.model_source:
            return WeightsPlan("kaggle_model", name, kg.model_source)
        if local is not None:
            digest = dir_hash(local, cache)
            return WeightsPlan("kaggle_dataset", name, digest[:16], str(local), digest)
        if kg.internet:
            return WeightsPlan("hub", name)
        raise WeightsError(
            f"model.name_or_path: {name!r} cannot reach a Kaggle session (internet is off). Attach it: "
            f"set cloud.kaggle.model_source to its Kaggle Model instance version "
            f"(owner/model/framework/variation/version, e.g. deepseek-ai/deepseek-coder/transformers/1.3b-base/1), "
            f"or point model.name_or_path at a local copy (uploaded once as a private dataset), "
            f"or set cloud.kaggle.internet: true (with cloud.kaggle.hf_token_secret for gated models)"
        )
    if backend == "sagemaker":
        sm = settings.sagemaker
        if sm.model_s3_uri:
            return WeightsPlan("s3", name, sm.model_s3_uri.rstrip("/") + "/")
        if local is not None:
            digest = dir_hash(local, cache)
            return WeightsPlan("s3", name, None, str(local), digest)
        if sm.network_isolation:
            raise WeightsError(
                f"model.name_or_path: {name!r} is a Hub id but cloud.sagemaker.network_isolation blocks the Hub: "
                f"set cloud.sagemaker.model_s3_uri to an s3:// prefix holding the weights, "
                f"or point model.name_or_path at a local copy (uploaded once)"
            )
        return WeightsPlan("hub", name)
    return WeightsPlan("hub", name)


def write_marker(folder: Path, plan: WeightsPlan) -> None:
    atomic_write_json(folder / WEIGHTS_MARKER, {"name": plan.name, "content_hash": plan.content_hash})


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).exists() for w in WEIGHT_FILES)


def _find_kaggle_model(input_root: Path, handle: str) -> Path | None:
    """Kaggle mounts a model at input/<model>/<framework>/<variation>/<version> (older: without the version)."""
    _owner, model, framework, variation, version = handle.split("/")
    for cand in (input_root / model / framework / variation / version, input_root / model / framework / variation):
        if cand.is_dir():
            if _has_weights(cand):
                return cand
            found = sorted(p.parent for p in cand.rglob("config.json") if _has_weights(p.parent))
            if found:
                return found[0]
    return None


def _find_marked(roots: list[Path], digest: str | None) -> Path | None:
    for root in roots:
        if not root.is_dir():
            continue
        for marker in sorted([*root.glob(WEIGHTS_MARKER), *root.glob(f"*/{WEIGHTS_MARKER}"),
                              *root.glob(f"*/*/{WEIGHTS_MARKER}")]):
            meta = json.loads(marker.read_text(encoding="utf-8"))
            if digest is None or meta.get("content_hash") == digest:
                return marker.parent
    return None


def what_to_attach(meta: dict[str, Any], platform: str) -> str:
    kind, name, source = meta.get("kind"), meta.get("name"), meta.get("source")
    if kind == "kaggle_model":
        return f"the Kaggle Model {source} (model_sources) is not mounted under input/: attach it to the kernel"
    if kind == "kaggle_dataset":
        return (f"the weights dataset for {name!r} (content hash {str(meta.get('content_hash'))[:16]}) "
                f"is not attached: add it to the kernel's dataset_sources")
    if kind == "s3":
        return f"the `model` channel ({source or 'the uploaded weights'}) holds no weights for {name!r}"
    return f"{name!r} could not be loaded on {platform}"


def resolve_in_job(meta: dict[str, Any] | None, platform: str, input_roots: list[Path]) -> tuple[str, bool] | None:
    """(name_or_path, local_files_only) for the trainer, or None when the source is missing.

    `meta` is the bundle's `model` entry; `input_roots` where the provider mounts
    inputs (Kaggle: /kaggle/input; SageMaker: the `model` channel).
    """
    if not meta or meta.get("kind") in ("builtin", None):
        return None if meta is None else (str(meta["name"]), True)
    kind = meta["kind"]
    if kind == "hub":
        return str(meta["name"]), False
    if kind == "kaggle_model":
        for root in input_roots:
            found = _find_kaggle_model(root, str(meta["source"]))
            if found is not None:
                return str(found), True
        return None
    if kind == "kaggle_dataset":
        found = _find_marked(input_roots, meta.get("content_hash"))
        return (str(found), True) if found is not None and _has_weights(found) else None
    if kind == "s3":
        for root in input_roots:
            if _has_weights(root):
                return str(root), True
            found = _find_marked([root], None)
            if found is not None and _has_weights(found):
                return str(found), True
        return None
    return None


def hf_token_env(secret_name: str | None) -> dict[str, str]:
    """Inside a Kaggle kernel: the HF token from a Kaggle secret (never written anywhere)."""
    if not secret_name:
        return {}
    try:
        from kaggle_secrets import UserSecretsClient  # type: ignore[import-not-found]
    except ImportError:
        value = os.environ.get("HF_TOKEN")
        return {"HF_TOKEN": value} if value else {}
    return {"HF_TOKEN": UserSecretsClient().get_secret(secret_name)}


__all__ = [
    "MODEL_NOT_FOUND",
    "WEIGHTS_MARKER",
    "WeightsError",
    "WeightsPlan",
    "dir_hash",
    "plan_weights",
    "resolve_in_job",
    "what_to_attach",
    "write_marker",
]
