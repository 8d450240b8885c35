"""Crash-safe checkpoint directories: commit protocol, verification, quarantine.

Torch-free on purpose: the worker uses it to answer `train`/`resume` (which
checkpoint would resume?) without importing torch. The trainer writes the
files of a checkpoint into a staging directory (see `state.write_snapshot`) and
hands it to `commit`, which makes it durable in an order that a crash at any
instant cannot break:

1. fsync every file and directory in staging;
2. write `manifest.json` last (sha256 + size of every file), fsync;
3. rename staging to `checkpoints/step-NNNNNNNN`, fsync `checkpoints/`;
4. atomically rewrite `LATEST`, fsync;
5. only then prune old checkpoints.

A checkpoint without a manifest was never committed; a manifest that does not
match its files was damaged afterwards. Both are quarantined on load, never
silently deleted, and the previous good checkpoint is used.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.core import layout
from uff_port.fsutil import (
    OLD_PREFIX,
    UnsafePath,
    atomic_write_text,
    confine_existing,
    find_symlinks,
    fsync_dir,
    fsync_tree,
    open_confined,
    open_confined_fd,
    recover_dir,
    replace_dir,
)
from uff_port.hashing import tree_manifest, verify_tree

CHECKPOINT_FORMAT: Final = 1
MANIFEST: Final = layout.MANIFEST
LATEST: Final = "LATEST"
QUARANTINE: Final = "quarantine"
WRITER_LOCK: Final = layout.CHECKPOINTS_LOCK  # in RUN_DIR, beside checkpoints/
_STEP_RE: Final = re.compile(r"^step-(\d{8,})$")
_STAGING_PREFIX: Final = ".staging-"
_PRUNED_PREFIX: Final = ".pruned-"  # renamed away before rmtree, so never half-deleted
_RESERVED: Final = frozenset({"format", "step", "created", "files"})
KILL_AT_ENV: Final = "UFF_PORT_CHECKPOINT_KILL_AT"
"""`STEP:POINT` (e.g. `12:manifest_written`): SIGKILL this process at that commit sub-step.
Lets crash tests hit the middle of a checkpoint write every time, not by luck."""
WORKER_PID_ENV: Final = "UFF_PORT_WORKER_PID"
"""Set for a trainer started by a worker: recorded in the writer lock, so a restarted
worker can tell a trainer whose worker is gone (an orphan it may reclaim) from a live one."""
COMMIT_POINTS: Final = (
    "begun", "files_synced", "manifest_written", "old_moved_aside", "renamed", "latest_written", "pruned"
)

Emit = Callable[..., None]
# Test seam: called with the name of each commit sub-step just after it completes,
# so a test can stop there (by raising) as if the process had been killed.
FaultHook = Callable[[str], None]


class CheckpointUnloadable(Exception):
    """Raised by a `find_resume_point` loader: the checkpoint verified but its state does not load."""


class CheckpointMismatch(Exception):
    """A verified checkpoint that belongs to another config or tokenizer."""

    def __init__(self, path: Path, differences: list[str]) -> None:
        self.path = path
        self.differences = differences
        super().__init__(
            f"checkpoint {path.name} was written for a different config/tokenizer; "
            "start a new run directory or restore the original config. Differences: "
            + "; ".join(differences)
        )


@dataclass
class ResumePoint:
    step: int
    path: Path
    manifest: dict[str, Any]
    state: Any = None
    """What the `find_resume_point` loader returned for it (the trainer's snapshot)."""


@dataclass
class WriterHolder:
    """The process holding a run's writer lock, as its lock file and /proc tell."""

    pid: int
    worker_pid: int | None

    @property
    def orphaned(self) -> bool:
        """Started by a worker that is gone: nobody will ever stop it but a new worker."""
        return self.worker_pid is not None and not _alive(self.worker_pid)


def step_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


class CheckpointStore:
    """The `checkpoints/` directory of one run; a single writer at a time."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        keep_last: int = 3,
        emit: Emit | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / layout.CHECKPOINTS
        self.keep_last = keep_last
        self._emit = emit
        self._fault = fault_hook
        self._kill_at = _kill_at_from_env()
        self._step: int | None = None  # the step being written, for KILL_AT_ENV
        self._counter = itertools.count()
        self._mine: set[Path] = set()  # staging dirs of this process still in use
        self._lock_fd: int | None = None

    # -- events ---------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        if self._emit is not None:
            self._emit(event, **fields)

    def _step_done(self, name: str) -> None:
        if self._fault is not None:
            self._fault(name)
        if self._kill_at is not None and self._kill_at == (self._step, name):
            os.kill(os.getpid(), signal.SIGKILL)

    # -- the single writer -------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.run_dir / WRITER_LOCK

    def acquire_writer(self, timeout: float = 0.0) -> bool:
        """Become the run's only checkpoint writer (an flock held until exit or release).

        A restarted trainer calls this with `checkpoint.grace_seconds` before
        `find_resume_point`: a predecessor orphaned by a dead worker may still
        be writing its final checkpoint, and that one should be resumed from.
        """
        if self._lock_fd is not None:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_confined_fd(self.run_dir, self.lock_path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        self._record_holder(fd)
        self._lock_fd = fd
        return True

    def _record_holder(self, fd: int) -> None:
        worker = os.environ.get(WORKER_PID_ENV, "")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"{os.getpid()}\n" + (f"worker {worker}\n" if worker.isdigit() else "")).encode(), 0)

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the lock: a worker hands it to the trainer it starts
        (flock belongs to the open file, so the lock is never free in between)."""
        return self._lock_fd

    def adopt_writer(self, fd: int) -> bool:
        """Take over the lock held by an inherited descriptor of our lock file.

        False if `fd` is not this run's lock file or does not hold the lock (then
        call `acquire_writer`): a descriptor number alone proves nothing.
        """
        if self._lock_fd is not None:
            return True
        try:
            held, ours = os.fstat(fd), os.stat(self.lock_path, follow_symlinks=False)
            if (held.st_dev, held.st_ino) != (ours.st_dev, ours.st_ino):
                return False
            # Succeeds at once on the open file that already holds the lock, fails on any other.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        os.set_inheritable(fd, False)
        self._record_holder(fd)
        self._lock_fd = fd
        return True

    def writer_holder(self) -> WriterHolder | None:
        """The live process that holds our lock file open and is recorded in it, or None.

        Checked in /proc, not only read from the file: the file is in the run
        directory, and whoever wrote a pid there must not make us signal it.
        """
        try:
            with open_confined(self.run_dir, self.lock_path, "rb") as fh:
                lines = fh.read(256).decode("ascii", "replace").split("\n")
            ours = os.stat(self.lock_path, follow_symlinks=False)
        except (OSError, UnsafePath):
            return None
        pid = int(lines[0]) if lines[0].strip().isdigit() else None
        if pid is None or pid == os.getpid() or not _holds_open(pid, (ours.st_dev, ours.st_ino)):
            return None
        worker = next((int(w[7:]) for w in lines[1:] if w.startswith("worker ") and w[7:].isdigit()), None)
        return WriterHolder(pid, worker)

    def release_writer(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def writer_pid(self) -> int | None:
        """Pid recorded by the last writer (it may have exited)."""
        try:
            with open_confined(self.run_dir, self.lock_path, "rb") as fh:
                text = fh.read(256).decode("ascii", "replace").split("\n")[0].strip()
        except (OSError, UnsafePath):
            return None
        return int(text) if text.isdigit() else None

    # -- writing ---------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """A fresh, empty staging directory for the checkpoint of `step`."""
        self._confined()
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._confined()
        name = f"{_STAGING_PREFIX}{step_name(step)}-{os.getpid()}-{next(self._counter)}"
        path = self.checkpoints_dir / name
        path.mkdir()
        self._mine.add(path)
        self._step = step
        self._step_done("begun")
        return path

    def commit(self, staging: Path, step: int, meta: dict[str, Any]) -> Path:
        """Make `staging` the durable checkpoint of `step`, move LATEST, prune."""
        staging = Path(staging)
        self._step = step
        self._confined()
        clash = _RESERVED & set(meta)
        if clash:
            raise ValueError(f"meta: keys {sorted(clash)} are reserved for the manifest")
        if (staging / MANIFEST).exists():
            raise ValueError(f"{staging}: already holds a {MANIFEST}")
        fsync_tree(staging)
        self._step_done("files_synced")

        manifest = {
            **meta,
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "created": time.time(),
            "files": tree_manifest(staging),
        }
        # The manifest goes last: its presence is what says "every file is complete".
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        with open(staging / MANIFEST, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(staging)
        self._step_done("manifest_written")
        return self._publish(staging, step)

    def _publish(self, staging: Path, step: int) -> Path:
        """Rename a complete, fsynced staging dir into place, then move LATEST, then prune."""
        final = self.checkpoints_dir / step_name(step)
        # A same-step checkpoint is moved aside first; `_recover_replaced` puts it
        # back if we die before the new one is in.
        replace_dir(staging, final, after_move_aside=lambda: self._step_done("old_moved_aside"))
        self._mine.discard(staging)
        self._step_done("renamed")

        # LATEST moves only now that the directory it names is durable.
        atomic_write_text(self.checkpoints_dir / LATEST, final.name + "\n")
        self._step_done("latest_written")
        self._prune(keep=final.name)
        self._step_done("pruned")
        return final

    def install(self, src: Path) -> ResumePoint:
        """Bring a committed checkpoint from elsewhere (a cloud pull, a session bundle) in.

        Verified where it is, copied into staging, fsynced, then published like a
        commit (rename, LATEST, prune): a crash leaves the old state or the new one.
        Raises ValueError naming the reason when `src` is not a good checkpoint.
        """
        manifest, reason = self.verify(Path(src))
        if manifest is None:
            raise ValueError(f"{src}: not a valid checkpoint: {reason}")
        step = int(manifest["step"])
        staging = self.begin(step)
        try:
            shutil.copytree(src, staging, dirs_exist_ok=True)
            fsync_tree(staging)
            final = self._publish(staging, step)
        except BaseException:
            self.abort(staging)
            raise
        return ResumePoint(step, final, manifest)

    def abort(self, staging: Path) -> None:
        """Throw away a staging directory (a failed or abandoned save)."""
        shutil.rmtree(staging, ignore_errors=True)
        self._mine.discard(Path(staging))

    def _prune(self, keep: str) -> None:
        committed = sorted(self._step_dirs(), key=lambda p: parse_step(p.name) or 0)
        excess = committed[: max(0, len(committed) - self.keep_last)]
        for path in excess:
            if path.name == keep:
                continue
            # rename first so a crash mid-delete never leaves a half checkpoint
            # that would later be quarantined as "corrupt".
            gone = self.checkpoints_dir / f"{_PRUNED_PREFIX}{path.name}-{os.getpid()}-{next(self._counter)}"
            os.rename(path, gone)
            shutil.rmtree(gone, ignore_errors=True)
        if excess:
            fsync_dir(self.checkpoints_dir)

    def cleanup_staging(self) -> list[str]:
        """Remove what a crash mid-write left behind; call at startup, before writing."""
        self._confined()
        if not self.checkpoints_dir.is_dir():
            return []
        self._recover_replaced()
        removed = []
        for entry in sorted(self.checkpoints_dir.iterdir()):
            name = entry.name
            if entry in self._mine:
                continue
            if name.startswith((_STAGING_PREFIX, _PRUNED_PREFIX)) or (
                name.startswith(f".{LATEST}.") and name.endswith(".tmp")
            ):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(name)
        if removed:
            fsync_dir(self.checkpoints_dir)
            self.emit(
                "log",
                level="info",
                message=f"removed {len(removed)} leftover(s) of an interrupted checkpoint write",
                paths=removed,
            )
        return removed

    def _recover_replaced(self) -> None:
        """Put back a same-step checkpoint moved aside by a commit that died mid-replace."""
        for entry in sorted(self.checkpoints_dir.glob(f"{OLD_PREFIX}step-*")):
            original = entry.name[len(OLD_PREFIX) :].split("-")
            recover_dir(self.checkpoints_dir / f"{original[0]}-{original[1]}")

    # -- reading ---------------------------------------------------------------

    def _confined(self) -> None:
        """Refuse (UnsafePath) a `checkpoints/` or `quarantine/` that leads out of the run directory.

        Checked before every write and every scan: a symlink planted there would
        make us resume from, and write into, a directory outside the run.
        """
        confine_existing(self.run_dir, self.checkpoints_dir)
        confine_existing(self.run_dir, self.checkpoints_dir / QUARANTINE)

    def _step_dirs(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        # Symlinks are listed too (is_dir follows them), so that a scan quarantines them.
        return [
            p for p in self.checkpoints_dir.iterdir()
            if (p.is_dir() or p.is_symlink()) and parse_step(p.name) is not None
        ]  # fmt: skip

    def _read_latest(self) -> tuple[str | None, str | None]:
        """(what LATEST names, None) or (None, why LATEST is unusable); (None, None) if absent."""
        try:
            with open_confined(self.checkpoints_dir, self.checkpoints_dir / LATEST, "rb") as fh:
                text = fh.read(4096).decode("utf-8").strip()
        except FileNotFoundError:
            return None, None
        except UnsafePath as exc:
            return None, f"LATEST {exc.why}"
        except (OSError, UnicodeDecodeError):
            return None, None
        return text or None, None

    def latest_name(self) -> str | None:
        """What LATEST says, or None when there is no readable LATEST."""
        return self._read_latest()[0]

    def latest(self) -> ResumePoint | None:
        """The newest committed checkpoint (what LATEST names, else the highest step with a
        manifest), files not re-hashed: what to copy or report. Resuming uses
        `find_resume_point`, which verifies and quarantines."""
        name = self.latest_name()
        step = parse_step(name) if name is not None else None
        if name is not None and step is not None:
            manifest = _read_manifest(self.checkpoints_dir / name)
            if isinstance(manifest, dict):
                return ResumePoint(step, self.checkpoints_dir / name, manifest)
        committed = self.list_committed()
        return committed[-1] if committed else None

    def list_committed(self) -> list[ResumePoint]:
        """Checkpoints that have a readable manifest, by step; files are not re-hashed."""
        self._confined()
        out = []
        for path in self._step_dirs():
            if path.is_symlink():
                continue
            manifest = _read_manifest(path)
            if isinstance(manifest, dict):
                out.append(ResumePoint(parse_step(path.name) or 0, path, manifest))
        return sorted(out, key=lambda p: p.step)

    def verify(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        """(manifest, "verified") or (None, reason) after re-hashing every file."""
        if path.is_symlink():
            return None, "is a symlink (never followed out of the run directory)"
        manifest = _read_manifest(path)
        if isinstance(manifest, str):
            return None, manifest
        if manifest.get("format") != CHECKPOINT_FORMAT:
            return None, f"unknown checkpoint format {manifest.get('format')!r}"
        step = parse_step(path.name)
        if step is not None and manifest.get("step") != step:
            return None, f"manifest step {manifest.get('step')!r} does not match {path.name}"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return None, "manifest lists no files"
        links = find_symlinks(path)
        if links:
            return None, f"holds symlinks (never followed): {', '.join(links[:5])}"
        report = verify_tree(path, files, exclude=[MANIFEST])
        if not report.ok:
            return None, report.summary()
        return manifest, "verified"

    def find_resume_point(
        self,
        expect: dict[str, Any] | None = None,
        load: Callable[[Path], Any] | None = None,
        trusted: Path | None = None,
    ) -> ResumePoint | None:
        """The newest usable checkpoint: LATEST first, then newest to oldest.

        One recovery path for every kind of damage: a checkpoint that fails
        verification, or whose state `load(path)` refuses (by raising
        CheckpointUnloadable: a pickle `weights_only` rejects, a wrong shape, a
        missing shard), is quarantined (event `checkpoint_quarantined`) and the
        next is tried; `load`'s result is the point's `state`. A verified one
        of another config/tokenizer raises CheckpointMismatch and stays put,
        since it is not damaged.

        `trusted`: a checkpoint verified by whoever handed us the writer lock
        without ever releasing it; used without re-hashing while it is still
        the newest, else the scan re-checks everything.
        """
        self._confined()
        if self.checkpoints_dir.is_dir():
            self._recover_replaced()
        tried: set[str] = set()
        candidates: list[Path] = []
        latest, problem = self._read_latest()
        if problem is not None:
            self._quarantine(self.checkpoints_dir / LATEST, problem)
        elif latest is not None:
            target = self.checkpoints_dir / latest
            if parse_step(latest) is not None and (target.is_dir() or target.is_symlink()):
                candidates.append(target)
            else:
                self._quarantine(
                    self.checkpoints_dir / LATEST, f"LATEST points at {latest!r}, which does not exist"
                )
        candidates += sorted(self._step_dirs(), key=lambda p: parse_step(p.name) or 0, reverse=True)
        trusted_manifest = self._still_newest(trusted, candidates) if trusted is not None else None
        for path in candidates:
            if path.name in tried:
                continue
            tried.add(path.name)
            manifest: dict[str, Any] | None
            if trusted_manifest is not None and path == trusted:
                manifest, reason = trusted_manifest, "verified"
            else:
                manifest, reason = self.verify(path)
            if manifest is None:
                self._quarantine(path, reason)
                continue
            if expect:
                differences = _differences(manifest, expect)
                if differences:
                    raise CheckpointMismatch(path, differences)
            state = None
            if load is not None:
                try:
                    state = load(path)
                except CheckpointUnloadable as exc:
                    self._quarantine(path, f"does not load: {exc}")
                    continue
            if path.name != latest:
                # LATEST pointed at something unusable: make it name what we resume.
                atomic_write_text(self.checkpoints_dir / LATEST, path.name + "\n")
            return ResumePoint(int(manifest["step"]), path, manifest, state)
        self.emit("log", level="info", message=f"no checkpoint in {self.checkpoints_dir}: starting fresh")
        return None

    def _still_newest(self, trusted: Path, candidates: list[Path]) -> dict[str, Any] | None:
        """The manifest of `trusted` if it is still a real directory and the first candidate."""
        if not candidates or candidates[0] != trusted or trusted.is_symlink() or not trusted.is_dir():
            return None
        newest = max((parse_step(p.name) or 0 for p in candidates), default=0)
        manifest = _read_manifest(trusted)
        if isinstance(manifest, str) or parse_step(trusted.name) != newest or manifest.get("step") != newest:
            return None
        return manifest

    def _quarantine(self, path: Path, reason: str) -> Path:
        qdir = self.checkpoints_dir / QUARANTINE
        self._confined()
        qdir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dest = qdir / f"{path.name}-{stamp}-{os.getpid()}-{next(self._counter)}"
        if path.is_dir() and not path.is_symlink():
            os.rename(path, dest)
        else:
            dest.mkdir()
            os.rename(path, dest / path.name)
        fsync_dir(qdir)
        fsync_dir(self.checkpoints_dir)
        self.emit("checkpoint_quarantined", path=str(dest), name=path.name, reason=reason)
        return dest


def _kill_at_from_env() -> tuple[int, str] | None:
    raw = os.environ.get(KILL_AT_ENV, "").strip()
    if not raw:
        return None
    step, _, point = raw.partition(":")
    if not step.isdigit() or point not in COMMIT_POINTS:
        raise ValueError(f"{KILL_AT_ENV}: expected STEP:POINT with POINT one of {list(COMMIT_POINTS)}, got {raw!r}")
    return int(step), point


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes: it holds nothing and will run nothing
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _holds_open(pid: int, file_id: tuple[int, int]) -> bool:
    """Whether process `pid` has the file (st_dev, st_ino) open (Linux /proc; False if unknown)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            st = os.stat(f"{fd_dir}/{name}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == file_id:
            return True
    return False


def _read_manifest(path: Path) -> dict[str, Any] | str:
    """The manifest, or a reason why there is none."""
    try:
        with open_confined(path, path / MANIFEST, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return f"no {MANIFEST} (the write never completed)"
    except UnsafePath as exc:
        return f"{MANIFEST} {exc.why}"
    except OSError as exc:
        return f"{MANIFEST} unreadable: {exc}"
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{MANIFEST} is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return f"{MANIFEST} is not a map"
    return data


def _differences(manifest: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    from uff_port.core.config import diff_views

    out: list[str] = []
    if "resume_hash" in expect and manifest.get("resume_hash") != expect["resume_hash"]:
        have, want = manifest.get("resume_view"), expect.get("resume_view")
        if isinstance(have, dict) and isinstance(want, dict):
            out.extend(diff_views(have, want))
        if not out:
            out.append(f"resume_hash: {manifest.get('resume_hash')!r} -> {expect['resume_hash']!r}")
    if "tokenizer_hash" in expect and manifest.get("tokenizer_hash") != expect["tokenizer_hash"]:
        out.append(f"tokenizer_hash: {manifest.get('tokenizer_hash')!r} -> {expect['tokenizer_hash']!r}")
    return out
