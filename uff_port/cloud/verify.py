"""Output manifests written by the remote session and checked by the pull.

The remote side hashes everything it leaves behind (`write_output_manifest`);
home refuses anything that does not match it exactly: a missing, extra,
truncated or altered file, or no manifest at all. Only a verified tree is
moved into the run directory, so a bad download can never become the
checkpoint a resume starts from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import atomic_write_json
from uff_port.hashing import VerifyReport, tree_manifest, verify_tree

MANIFEST_NAME: Final = "uff-output-manifest.json"
MANIFEST_VERSION: Final = 1
# Kaggle adds the kernel's log beside its outputs; it is not ours to verify.
IGNORED_SUFFIXES: Final = (".log",)


def write_output_manifest(root: str | Path, **meta: Any) -> dict[str, Any]:
    """Hash every file under `root` into `root/uff-output-manifest.json` (durably)."""
    base = Path(root)
    files = tree_manifest(base, exclude=(MANIFEST_NAME,))
    doc = {"version": MANIFEST_VERSION, "created": time.time(), "files": files, **meta}
    atomic_write_json(base / MANIFEST_NAME, doc)
    return doc


@dataclass
class PullCheck:
    ok: bool
    reason: str
    report: VerifyReport | None
    meta: dict[str, Any]

    def to_event(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "reason": self.reason}
        if self.report is not None:
            out.update(self.report.to_dict())
        return out


def check_pull(root: str | Path) -> PullCheck:
    """Verify a downloaded tree against the manifest it carries."""
    base = Path(root)
    path = base / MANIFEST_NAME
    if not path.is_file():
        return PullCheck(False, f"no {MANIFEST_NAME} in the pulled output", None, {})
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = doc["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a map")
    except (ValueError, KeyError, TypeError) as exc:
        return PullCheck(False, f"unreadable manifest: {exc}", None, {})
    ignored = [
        rel
        for rel in _all_files(base)
        if rel not in files and rel.endswith(IGNORED_SUFFIXES) and "/" not in rel
    ]
    report = verify_tree(base, files, exclude=(MANIFEST_NAME, *ignored))
    meta = {k: v for k, v in doc.items() if k != "files"}
    return PullCheck(report.ok, report.summary(), report, meta)


def _all_files(base: Path) -> list[str]:
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
