"""sha256 manifests of directory trees: build one, verify one.

Used for checkpoints, artifacts and cloud pulls alike, so "verified" means the
same thing everywhere: every listed file present with its exact size and
sha256, and no file that is not listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(root: str | os.PathLike[str], exclude: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of every regular file under root, sorted."""
    base = Path(root)
    skip = set(exclude)
    out = []
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(base).as_posix()
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def tree_manifest(
    root: str | os.PathLike[str], exclude: Iterable[str] = ()
) -> dict[str, dict[str, object]]:
    """`{relpath: {"sha256": hex, "size": bytes}}` for every file under root."""
    base = Path(root)
    return {
        rel: {"sha256": sha256_file(base / rel), "size": (base / rel).stat().st_size}
        for rel in list_files(base, exclude)
    }


@dataclass
class VerifyReport:
    """What differs between a tree and its manifest; empty lists mean verified."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    hash_mismatch: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.size_mismatch or self.hash_mismatch)

    def summary(self) -> str:
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.extra),
            ("wrong size (truncated?)", self.size_mismatch),
            ("sha256 mismatch", self.hash_mismatch),
        ):
            if items:
                parts.append(f"{label}: {', '.join(items)}")
        return "; ".join(parts) if parts else "verified"

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "missing": self.missing,
            "extra": self.extra,
            "size_mismatch": self.size_mismatch,
            "hash_mismatch": self.hash_mismatch,
        }


def verify_tree(
    root: str | os.PathLike[str],
    files: dict[str, dict[str, object]],
    exclude: Iterable[str] = (),
) -> VerifyReport:
    """Re-hash `root` against `files` (as made by tree_manifest)."""
    base = Path(root)
    report = VerifyReport()
    present = set(list_files(base, exclude)) if base.is_dir() else set()
    for rel, meta in sorted(files.items()):
        path = base / rel
        if rel not in present:
            report.missing.append(rel)
            continue
        if path.stat().st_size != meta.get("size"):
            report.size_mismatch.append(rel)
            continue
        if sha256_file(path) != meta.get("sha256"):
            report.hash_mismatch.append(rel)
    report.extra = sorted(present - set(files))
    return report


CANONICAL_SEPARATORS = (",", ": ")
"""Fixed item and key separators of canonical JSON (with indent=2, the json module's own)."""
SORTED_LISTS = frozenset({"target_modules", "modules_to_save", "exclude_modules"})
"""List-valued keys that mean sets (peft writes a Python set in hash order): sorted when canonical."""


def _sort_key(value: object) -> tuple[int, str]:
    """Strings (module names) in plain string order; anything else after them, by its JSON."""
    return (0, value) if isinstance(value, str) else (1, json.dumps(value, sort_keys=True))


def canonical_json(obj: object) -> str:
    """The one byte form of a JSON document: sorted keys, set-like lists sorted, fixed separators.

    Two writes of the same content give the same bytes, so the same weights and
    config give the same sha256 and artifact id on every run and machine.
    """

    def norm(value: object) -> object:
        if isinstance(value, dict):
            return {str(k): (sorted(map(norm, v), key=_sort_key) if k in SORTED_LISTS and isinstance(v, list)
                             else norm(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    return json.dumps(norm(obj), indent=2, sort_keys=True, separators=CANONICAL_SEPARATORS) + "\n"


def canonicalize_json_files(root: str | os.PathLike[str], skip: Iterable[str] = ()) -> list[str]:
    """Rewrite every `*.json` under `root` (except `skip`, relative paths) in canonical form; return them."""
    base = Path(root)
    done = []
    for rel in list_files(base, exclude=skip):
        if not rel.endswith(".json"):
            continue
        path = base / rel
        text = canonical_json(json.loads(path.read_text(encoding="utf-8")))
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        done.append(rel)
    return done
