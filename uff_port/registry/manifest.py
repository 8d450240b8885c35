"""The artifact manifest (schema v1): what one trained unit is, content-addressed.

An artifact is a directory (a peft adapter + tokenizer) plus this JSON. Its id
is the sha256 of the sorted `"<sha256>  <path>\\n"` lines of its files (the
`sha256sum` format), so the same bytes get the same id on every site and no
metadata edit can pass for other weights. docs/registry.md is the reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from uff_port.hashing import canonical_json
from uff_port.protocol.errors import ErrorCode
from uff_port.registry.errors import INVALID_MANIFEST, RegistryError

SCHEMA_VERSION: Final = 1
MANIFEST_NAME: Final = "artifact.json"
"""Where a manifest lives inside its artifact directory (never part of `files`)."""
ROLES: Final = ("textgen", "embed", "runtime", "ufm", "ucm", "urm", "ulm", "uim", "uam")
INTERFACE_CONTRACT: Final = "uff-port.causal-lm/1"
"""Prompt in, text out, through a peft LoRA adapter on a causal LM base."""
SEMVER_RE: Final = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
_HEX64: Final = r"^[0-9a-f]{64}$"

Hex64 = Annotated[str, Field(pattern=_HEX64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    sha256: Hex64
    size: int = Field(ge=0)


class BaseModelRef(_Strict):
    id: str = Field(min_length=1)
    """HF hub id, local path or `builtin:tiny-llama`: what the adapter was trained on."""
    revision: str | None = None


class Lineage(_Strict):
    run_id: str = Field(min_length=1)
    attempts: int = Field(ge=1)
    """Trainer starts it took (1 = never crashed or preempted)."""
    backend: str = Field(min_length=1)
    final_step: int | None = Field(default=None, ge=0)
    parent: str | None = None
    sessions: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=10_000, exclude_if=lambda v: not v
    )
    """Cloud sessions that trained it, in order (from the merged events' `session` tags); left out
    for a local run, so manifests without sessions keep their bytes."""


class Interface(_Strict):
    contract: str = INTERFACE_CONTRACT
    kind: str = "lora"
    task_type: str = "CAUSAL_LM"
    target_modules: list[str] = Field(default_factory=list)
    r: int | None = Field(default=None, gt=0)


class ArtifactManifest(_Strict):
    schema_version: Literal[1]
    artifact_id: Hex64
    name: str = Field(min_length=1, max_length=200)
    role: Literal["textgen", "embed", "runtime", "ufm", "ucm", "urm", "ulm", "uim", "uam"]
    version: str
    files: dict[str, FileEntry] = Field(min_length=1)
    base_model: BaseModelRef
    tokenizer_hash: Hex64 | None = None
    dataset_hash: Hex64 | None = None
    config_hash: Hex64 | None = None
    code_version: str = Field(min_length=1)
    lineage: Lineage
    metrics: dict[str, float | None] = Field(default_factory=dict)
    interface: Interface = Field(default_factory=Interface)
    created_at: str | None = None
    """Only when the caller injects one: manifests are otherwise deterministic."""

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER_RE.match(v):
            raise ValueError(f"expected a semantic version like 1.2.0, got {v!r}")
        return v

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in v:
            p = PurePosixPath(rel)
            if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or str(p) != rel:
                raise ValueError(f"file path {rel!r} must be relative, normalized, without '..'")
            if rel == MANIFEST_NAME:
                raise ValueError(f"{MANIFEST_NAME} cannot list itself")
        return v

    @field_validator("metrics", mode="before")
    @classmethod
    def _no_bools(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key, val in v.items():
                if isinstance(val, bool):
                    raise ValueError(f"metric {key!r} must be a number, not a boolean")
        return v

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float | None]) -> dict[str, float | None]:
        for key, val in v.items():
            if val is not None and not math.isfinite(val):
                raise ValueError(f"metric {key!r} must be finite or null")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    def files_dict(self) -> dict[str, dict[str, object]]:
        """`files` in the shape `uff_port.hashing.verify_tree` takes."""
        return {rel: {"sha256": f.sha256, "size": f.size} for rel, f in self.files.items()}

    @property
    def short_id(self) -> str:
        return self.artifact_id[:12]


def artifact_id(files: dict[str, Any]) -> str:
    """sha256 over the sorted `"<sha256>  <path>\\n"` lines (reproducible with sha256sum)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        meta = files[rel]
        sha = meta.sha256 if isinstance(meta, FileEntry) else meta["sha256"]
        h.update(f"{sha}  {rel}\n".encode())
    return h.hexdigest()


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _friendly(err: Any) -> str:
    kind = err.get("type", "")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error" and err.get("loc", ("",))[0] == "role":
        return f"unknown role {err.get('input')!r}; expected one of {', '.join(ROLES)}"
    if kind == "string_pattern_mismatch":
        return "expected 64 lower-case hex digits (a sha256)"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def parse_manifest(raw: Any) -> ArtifactManifest:
    """Validate a manifest map; raise RegistryError(invalid_manifest) naming every bad field.

    Beyond the schema, the id must equal the hash of the listed files: a
    manifest whose id and file hashes disagree was edited or corrupted.
    """
    if not isinstance(raw, dict):
        raise RegistryError(
            INVALID_MANIFEST,
            f"<root>: manifest must be a JSON object, got {type(raw).__name__}",
            {"problems": [f"<root>: expected an object, got {type(raw).__name__}"]},
        )
    if "schema_version" in raw and raw["schema_version"] != SCHEMA_VERSION:
        problem = f"schema_version: unsupported {raw['schema_version']!r}; this build reads {SCHEMA_VERSION}"
        raise RegistryError(INVALID_MANIFEST, problem, {"problems": [problem]})
    try:
        manifest = ArtifactManifest.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_loc(e['loc'])}: {_friendly(e)}" for e in exc.errors()]
        raise RegistryError(
            INVALID_MANIFEST, "invalid manifest: " + "; ".join(problems), {"problems": problems}
        ) from None
    expected = artifact_id(manifest.files)
    if manifest.artifact_id != expected:
        problem = f"artifact_id: does not match the hashes in files (they give {expected})"
        raise RegistryError(INVALID_MANIFEST, problem, {"problems": [problem]})
    return manifest


def load_manifest(path: str | Path) -> ArtifactManifest:
    """Read a manifest file, or `<dir>/artifact.json` when given its artifact directory."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(ErrorCode.NOT_FOUND, f"manifest: no such file {str(p)!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"<root>: {p} is not valid JSON ({exc})"
        raise RegistryError(INVALID_MANIFEST, problem, {"problems": [problem]}) from None
    return parse_manifest(raw)
