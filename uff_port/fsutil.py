"""Durable file operations shared by checkpoints, journals, registry and pulls.

A write is durable only after the file *and* its directory are fsynced: the
file's data reaches disk with the first, its name with the second. Every
"commit" in this project is: write to a temporary name, fsync, rename, fsync
the directory.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final


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


# -- confinement of files inside a run -------------------------------------------

UNSAFE_PATH = "unsafe_path"
"""Error code for a path that would lead outside its root (a symlink, or not a plain file)."""


class UnsafePath(Exception):
    """A path inside a run directory that is a symlink out of it, or not what it claims to be."""

    code = UNSAFE_PATH

    def __init__(self, path: str | os.PathLike[str], root: str | os.PathLike[str], why: str) -> None:
        self.path = os.fspath(path)
        self.root = os.fspath(root)
        self.why = why
        super().__init__(f"{self.path}: {why}; refusing to follow it out of {self.root}")


def is_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """True if the already-resolved `path` is `root` (resolved) or lies below it."""
    base, p = Path(root).resolve(), Path(path)
    return p == base or base in p.parents


def find_symlinks(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths of every symlink under `root` (files and directories), sorted."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out.append(os.path.relpath(full, root))
    return sorted(out)


def confine_existing(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """`path` resolved, refusing (UnsafePath) one whose symlinks lead outside `root`.

    A path that does not exist yet is returned as given: its creation is
    confined by whoever creates it (a mkdir, or `open_confined`).
    """
    p = Path(path)
    if not os.path.lexists(p):
        return p
    resolved = p.resolve()
    if not is_inside(root, resolved):
        raise UnsafePath(p, root, "is a symlink that leads outside" if p.is_symlink() else "resolves outside")
    return resolved


_MODES = {
    "r": os.O_RDONLY,
    "rb": os.O_RDONLY,
    "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "rb+": os.O_RDWR,
}


def open_confined_fd(root: str | os.PathLike[str], path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """`os.open` of a regular file under `root`, never through a symlink out of it.

    O_NOFOLLOW refuses a symlink as the last component; the path of the file
    actually opened (read back from /proc/self/fd, so a directory swapped in
    between cannot fool it) must then lie under `root`. O_NONBLOCK while
    opening: a FIFO planted in place of a log must not hang the open; it is
    refused as not a regular file.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(path, root, "is a symlink") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, opened for writing
            raise UnsafePath(path, root, "is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(path, root, "is not a regular file")
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: resolve the name instead
            real = os.path.realpath(path)
        if not is_inside(root, real):
            raise UnsafePath(path, root, "lies outside (through a symlinked directory)")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_confined(root: str | os.PathLike[str], path: str | os.PathLike[str], mode: str = "rb") -> IO[Any]:
    """`open(path, mode)` for a file under `root` that refuses symlinks out of it (see open_confined_fd)."""
    fd = open_confined_fd(root, path, _MODES[mode])
    if "b" in mode:
        return open(fd, mode)
    return open(fd, mode, encoding="utf-8")
