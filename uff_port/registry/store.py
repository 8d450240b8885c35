"""The local registry: content-addressed artifact files + one SQLite database.

Layout::

    REGISTRY/registry.db            artifacts, aliases, audit (SQLite, WAL)
    REGISTRY/artifacts/<id>/        the artifact's files + artifact.json

Why SQLite rather than a directory of JSON files: an alias move is a
compare-and-swap that must also append to the audit log; `BEGIN IMMEDIATE`
gives both in one atomic, durable transaction across processes, with no lock
files to go stale when a process dies holding them. Files stay plain files so
they can be re-hashed, copied or served without the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import (
    UnsafePath,
    atomic_write_text,
    fsync_dir,
    open_confined,
    recover_dir,
    replace_dir,
)
from uff_port.hashing import VerifyReport, list_files, verify_tree
from uff_port.registry.errors import (
    ALIAS_CONFLICT,
    INVALID_ARGS,
    NOT_FOUND,
    UNSAFE_PATH,
    VERIFY_FAILED,
    RegistryError,
)
from uff_port.registry.manifest import MANIFEST_NAME, ArtifactManifest, parse_manifest
from uff_port.registry.runmanifest import content_excludes, refuse_symlinks

ALIASES: Final = ("candidate", "stable", "previous")
ENV_VAR: Final = "UFF_PORT_REGISTRY"
DEFAULT_ROOT: Final = "registry"
_MIN_PREFIX: Final = 6
_HEX: Final = frozenset("0123456789abcdef")
_CHUNK: Final = 1 << 20
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    version TEXT NOT NULL,
    manifest TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    role TEXT NOT NULL,
    alias TEXT NOT NULL,
    artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id),
    PRIMARY KEY (role, alias)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    action TEXT NOT NULL,
    role TEXT NOT NULL,
    alias TEXT,
    old_id TEXT,
    new_id TEXT,
    actor TEXT NOT NULL,
    note TEXT
);
"""


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _copy_hashed(root: Path, src: Path, dst: Path) -> str:
    """Copy one file from under `root` (never through a symlink), fsync it, return the sha256 written."""
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        fin = open_confined(root, src, "rb")
    except UnsafePath as exc:
        raise RegistryError(UNSAFE_PATH, str(exc), {"path": exc.path}) from None
    with fin, dst.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


class Registry:
    """One registry directory. Cheap to open; every method is one short transaction."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.artifacts_dir = self.root / "artifacts"
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so a CAS reads and
        # writes under one write lock (BEGIN IMMEDIATE), never a deferred upgrade.
        self._db = sqlite3.connect(self.root / "registry.db", timeout=60.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an alias move survives power loss
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- artifacts ---------------------------------------------------------

    def artifact_dir(self, artifact_id: str) -> Path:
        return self.artifacts_dir / artifact_id

    def register(
        self, source: Path, manifest: ArtifactManifest, actor: str = "cli"
    ) -> tuple[ArtifactManifest, bool]:
        """Copy a verified artifact in; returns (manifest, created). Idempotent for equal manifests."""
        existing = self._row(manifest.artifact_id)
        if existing is not None:
            if existing.to_dict() != manifest.to_dict():
                raise RegistryError(
                    INVALID_ARGS,
                    f"artifact_id: {manifest.short_id} is already registered with other metadata",
                    {"artifact_id": manifest.artifact_id, "registered": existing.to_dict()},
                )
            return existing, False
        refuse_symlinks(source)
        # Names and sizes first (cheap); the sha256s are checked on the bytes as they are copied,
        # so the source is read once, not once to verify and once to copy.
        report = VerifyReport()
        present = set(list_files(source, content_excludes(source))) if source.is_dir() else set()
        for rel, meta in sorted(manifest.files.items()):
            if rel not in present:
                report.missing.append(rel)
            elif (source / rel).lstat().st_size != meta.size:
                report.size_mismatch.append(rel)
        report.extra = sorted(present - set(manifest.files))
        if report.ok:
            self._store_files(source, manifest, report)
        if not report.ok:
            raise RegistryError(
                VERIFY_FAILED, f"{source}: {report.summary()}", {"verify": report.to_dict()}
            )
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                (manifest.artifact_id, manifest.name, manifest.role, manifest.version,
                 json.dumps(manifest.to_dict(), sort_keys=True), time.time()),
            )
            created = cur.rowcount == 1
            if created:
                self._audit(db, "register", manifest.role, None, None, manifest.artifact_id, actor)
        return manifest, created

    def _store_files(self, source: Path, manifest: ArtifactManifest, report: VerifyReport) -> None:
        """Copy into a temp dir, hashing; rename it to artifacts/<id> only if every hash matched."""
        final = self.artifact_dir(manifest.artifact_id)
        recover_dir(final)  # a replacement (below) that died mid-swap
        if final.is_dir() and verify_tree(final, manifest.files_dict(), exclude=(MANIFEST_NAME,)).ok:
            return
        tmp = self.artifacts_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            for rel, meta in sorted(manifest.files.items()):
                if _copy_hashed(source, source / rel, tmp / rel) != meta.sha256:
                    report.hash_mismatch.append(rel)
            if report.hash_mismatch:
                return
            atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
            for d in sorted({(tmp / rel).parent for rel in manifest.files}, reverse=True):
                fsync_dir(d)
            fsync_dir(tmp)
            try:
                # A corrupt earlier copy is replaced whole; the new name is fsynced before the DB row.
                replace_dir(tmp, final)
            except OSError:
                # Another process stored the same content first; same id means same bytes.
                if not final.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _row(self, artifact_id: str) -> ArtifactManifest | None:
        row = self._db.execute(
            "SELECT manifest FROM artifacts WHERE artifact_id = ?", (artifact_id,)
        ).fetchone()
        return parse_manifest(json.loads(row[0])) if row else None

    def resolve(self, ref: str, role: str | None = None) -> ArtifactManifest:
        """An artifact by full id, unique id prefix, or alias (`stable`, `ufm:stable`)."""
        if ":" in ref:
            role, _, alias = ref.partition(":")
            ref = alias
        if ref in ALIASES:
            target = self.aliases(role or "textgen").get(ref)
            if target is None:
                raise RegistryError(NOT_FOUND, f"artifact: alias {role or 'textgen'}:{ref} is not set")
            ref = target
        ref = ref.lower()
        if len(ref) < _MIN_PREFIX or not set(ref) <= _HEX:  # also keeps LIKE wildcards out
            raise RegistryError(
                INVALID_ARGS,
                f"artifact: {ref!r} is not an alias ({', '.join(ALIASES)}) nor {_MIN_PREFIX}+ hex digits of an id",
            )
        rows = self._db.execute(
            "SELECT artifact_id FROM artifacts WHERE artifact_id LIKE ? || '%'", (ref,)
        ).fetchall()
        if len(rows) != 1:
            what = "no artifact" if not rows else f"{len(rows)} artifacts"
            raise RegistryError(NOT_FOUND, f"artifact: {what} match {ref!r}")
        found = self._row(rows[0][0])
        assert found is not None
        return found

    def artifacts(self, role: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT artifact_id, name, role, version, registered_at FROM artifacts"
        params: tuple[Any, ...] = ()
        if role:
            sql, params = sql + " WHERE role = ?", (role,)
        alias_of: dict[str, list[str]] = {}
        for r, alias, aid in self._db.execute("SELECT role, alias, artifact_id FROM aliases"):
            alias_of.setdefault(aid, []).append(f"{r}:{alias}")
        return [
            {"artifact_id": a, "name": n, "role": r, "version": v, "registered_at": t,
             "aliases": sorted(alias_of.get(a, []))}
            for a, n, r, v, t in self._db.execute(sql + " ORDER BY registered_at, artifact_id", params)
        ]

    def verify(self, artifact_id: str) -> VerifyReport:
        manifest = self.resolve(artifact_id)
        return verify_tree(
            self.artifact_dir(manifest.artifact_id), manifest.files_dict(), exclude=(MANIFEST_NAME,)
        )

    def require_verified(self, manifest: ArtifactManifest) -> None:
        report = verify_tree(
            self.artifact_dir(manifest.artifact_id), manifest.files_dict(), exclude=(MANIFEST_NAME,)
        )
        if not report.ok:
            raise RegistryError(
                VERIFY_FAILED,
                f"artifact {manifest.short_id}: {report.summary()}",
                {"artifact_id": manifest.artifact_id, "verify": report.to_dict()},
            )

    # -- aliases -----------------------------------------------------------

    def aliases(self, role: str) -> dict[str, str]:
        return dict(self._db.execute("SELECT alias, artifact_id FROM aliases WHERE role = ?", (role,)))

    def move_aliases(
        self,
        role: str,
        moves: dict[str, str | None],
        expected: dict[str, str | None],
        action: str,
        actor: str = "cli",
        note: dict[str, Any] | None = None,
    ) -> int:
        """Compare-and-swap: apply `moves` only if every alias in `expected` still holds its value.

        Read, check, write and audit happen under one `BEGIN IMMEDIATE` lock,
        so of two processes that expected the same value exactly one succeeds.
        Returns the audit seq of the last row written.
        """
        bad = [a for a in (*moves, *expected) if a not in ALIASES]
        if bad:
            raise RegistryError(INVALID_ARGS, f"alias: unknown {bad}; expected one of {list(ALIASES)}")
        with self._write() as db:
            current = dict(db.execute("SELECT alias, artifact_id FROM aliases WHERE role = ?", (role,)))
            for alias, want in expected.items():
                if current.get(alias) != want:
                    raise RegistryError(
                        ALIAS_CONFLICT,
                        f"{role}:{alias} moved to {current.get(alias)} (expected {want}); retry against it",
                        {"role": role, "alias": alias, "expected": want, "actual": current.get(alias)},
                    )
            seq = 0
            for alias, new in moves.items():
                old = current.get(alias)
                if old == new:
                    continue
                if new is None:
                    db.execute("DELETE FROM aliases WHERE role = ? AND alias = ?", (role, alias))
                else:
                    db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (role, alias, new))
                seq = self._audit(db, action, role, alias, old, new, actor, note)
        return seq

    def _audit(
        self,
        db: sqlite3.Connection,
        action: str,
        role: str,
        alias: str | None,
        old: str | None,
        new: str | None,
        actor: str,
        note: dict[str, Any] | None = None,
    ) -> int:
        cur = db.execute(
            "INSERT INTO audit (ts, action, role, alias, old_id, new_id, actor, note) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), action, role, alias, old, new, actor,
             json.dumps(note, sort_keys=True) if note else None),
        )
        return int(cur.lastrowid or 0)

    def audit(self, role: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT seq, ts, action, role, alias, old_id, new_id, actor, note FROM audit"
        params: tuple[Any, ...] = ()
        if role:
            sql, params = sql + " WHERE role = ?", (role,)
        rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit)).fetchall()
        keys = ("seq", "ts", "action", "role", "alias", "old_id", "new_id", "actor", "note")
        out = [dict(zip(keys, r, strict=True)) for r in reversed(rows)]
        for row in out:
            row["note"] = json.loads(row["note"]) if row["note"] else None
        return out

    def releases(self, role: str | None = None) -> list[dict[str, Any]]:
        """Every stable release in order: each move of a `stable` alias from the audit log."""
        out = []
        for row in self.audit(role, limit=10_000):
            if row["alias"] != "stable" or row["new_id"] is None:
                continue
            manifest = self._row(row["new_id"])
            out.append({
                "seq": row["seq"], "ts": row["ts"], "role": row["role"], "action": row["action"],
                "artifact_id": row["new_id"], "replaced": row["old_id"], "actor": row["actor"],
                "version": manifest.version if manifest else None,
                "name": manifest.name if manifest else None,
            })
        return out
