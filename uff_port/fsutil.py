"""Durable file operations shared by checkpoints, journals, registry and pulls.

A write is durable only after the file *and* its directory are fsynced: the
file's data reaches disk with the first, its name with the second. Every
"commit" in this project is: write to a temporary name, fsync, rename, fsync
the directory.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new file, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def confine(root: str | os.PathLike[str], candidate: str | os.PathLike[str]) -> Path:
    """Resolve `candidate` under `root` and refuse anything that escapes it.

    Relative candidates are taken relative to root; symlinks are resolved
    before the check so a link cannot smuggle a path outside.
    """
    base = Path(root).resolve()
    path = Path(candidate)
    resolved = (path if path.is_absolute() else base / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"path {os.fspath(candidate)!r} escapes {os.fspath(base)!r}")
    return resolved


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in an exception's chain (a commit wraps the OSError it hit).

    Native writers (safetensors, torch's zip writer) raise their own types: for those the
    OS's words in the message are all there is.
    """
    seen: BaseException | None = exc
    for _ in range(16):  # chains are short; a cycle must not hang us
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if any(s in text for s in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "os error 28")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
