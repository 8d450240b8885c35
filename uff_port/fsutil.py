"""Durable file operations shared by checkpoints, journals, registry and pulls.

A write is durable only after the file *and* its directory are fsynced: the
file's data reaches disk with the first, its name with the second. Every
"commit" in this project is: write to a temporary name, fsync, rename, fsync
the directory.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final


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


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Every file and directory under `root`, then `root` itself."""
    # Children before parents: a directory entry is only worth syncing once
    # what it names is on disk.
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(dirpath) / name)
        for name in dirs:
            fsync_dir(Path(dirpath) / name)
    fsync_dir(root)


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


OLD_PREFIX: Final = ".old-"
"""A directory moved aside by `replace_dir`, put back by `recover_dir` if we died mid-swap."""
_swaps = itertools.count()


def replace_dir(new: str | os.PathLike[str], dst: str | os.PathLike[str],
                after_move_aside: Callable[[], None] | None = None) -> None:
    """Make the (complete, fsynced) directory `new` be `dst`, replacing any old one.

    rename(2) cannot replace a non-empty directory, and rmtree-then-rename leaves a
    window with no `dst` at all. So: move the old one aside under a recognisable
    name, rename the new one in, fsync the parent, and only then delete the old.
    A crash in between leaves either the old `dst` or the aside copy, which
    `recover_dir(dst)` puts back; never a half-deleted directory under `dst`.
    """
    new_p, dst_p = Path(new), Path(dst)
    if dst_p.exists():
        old = dst_p.with_name(f"{OLD_PREFIX}{dst_p.name}-{os.getpid()}-{next(_swaps)}")
        os.rename(dst_p, old)
        if after_move_aside is not None:
            after_move_aside()
        os.rename(new_p, dst_p)
        fsync_dir(dst_p.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new_p, dst_p)
        fsync_dir(dst_p.parent)


def recover_dir(dst: str | os.PathLike[str]) -> bool:
    """Undo a `replace_dir` that died mid-swap: put the old `dst` back if it is missing,
    else drop the stale aside copies. True when something was put back."""
    dst_p = Path(dst)
    if not dst_p.parent.is_dir():
        return False
    restored = False
    for aside in sorted(dst_p.parent.glob(f"{OLD_PREFIX}{dst_p.name}-*")):
        if not dst_p.exists():
            os.rename(aside, dst_p)
            restored = True
        else:
            shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(dst_p.parent)
    return restored


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
