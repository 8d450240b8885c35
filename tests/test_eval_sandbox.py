"""Hostile completions in the real sandbox: each fails with a reason, nothing survives or leaks."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uff_port.eval.sandbox import UID_BASE, GiB, Limits, Sandbox
from uff_port.eval.suites import Task

ROOT = Path(__file__).resolve().parents[1]
MARK = f"uffprobe{os.getpid()}"
TASK = Task("hostile/0", "def f():\n", "def check(c):\n    assert c() == 1\n", entry_point="f")


def ours(uid: int) -> bool:
    """A sandbox uid of this test process (other evaluators may run meanwhile)."""
    first = UID_BASE + (os.getpid() % 1_000_000) * 64
    return first <= uid < first + 64


def leftovers() -> list[str]:
    """Processes the samples started (by their marker) or running as one of our sandbox uids."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if MARK in cmd or ours(uid):
            found.append(f"{pid} uid={uid} {cmd[:80]}")
    return found


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = sk-live-123\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk-live-123")
    outside = tmp_path / "outside"
    outside.mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0)
    try:
        yield {"home": home, "outside": outside, "port": listener.getsockname()[1]}  # type: ignore[dict-item]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody reached the host's loopback
    finally:
        listener.close()


def hostile(e: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """name -> (function body, a word its failure reason must contain)."""
    probe_repo = ROOT / f"{MARK}-written"
    return {
        "fork bomb": ("    import os\n    while True:\n        os.fork()\n", ""),
        "infinite loop": ("    while True:\n        pass\n", "timed out"),
        "memory bomb": ("    x = bytearray(50 * (1 << 30))\n    return 1\n", "memory limit"),
        # page faults are slow on a loaded VM: this one may hit the clock before the limit
        "gradual memory": ("    xs = []\n    while True:\n        xs.append(bytearray(64 << 20))\n", ""),
        "write outside": (f"    open({str(e['outside'] / 'pwned')!r}, 'w').write('x')\n"
                          f"    open({str(probe_repo)!r}, 'w').write('x')\n    return 1\n", "Error"),
        "read ~/.aws": ("    import os\n    return open(os.path.expanduser('~/.aws/credentials')).read()\n",
                        "FileNotFoundError"),
        "read the real home": (f"    return open({str(e['home'] / '.aws' / 'credentials')!r}).read()\n", "Error"),
        "env secret": ("    import os\n    return os.environ['AWS_SECRET_ACCESS_KEY']\n", "KeyError"),
        "socket out": ("    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n    return 1\n",
                       "OSError"),
        "socket to host loopback": (f"    import socket\n    socket.create_connection(('127.0.0.1', {e['port']}), "
                                    "timeout=2)\n    return 1\n", "Error"),
        "kill parent": ("    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                        f"    os.kill({os.getpid()}, signal.SIGKILL)\n    return 1\n", ""),
        "escape the group": ("    import subprocess, sys\n    subprocess.Popen([sys.executable, '-c', "
                             f"'import time; time.sleep(300)', '{MARK}'], start_new_session=True)\n"
                             "    return 0\n", "AssertionError"),
        "exit early": ("    import sys\n    sys.exit(0)\n", "SystemExit"),
        "hard exit": ("    import os\n    os._exit(0)\n", "exited before its tests finished"),
    }


def run_hostile(sb: Sandbox, e: dict[str, Path]) -> dict[str, tuple[bool, str]]:
    cases = hostile(e)
    t0 = time.monotonic()
    results = sb.run_many(TASK.program(body) for body, _ in cases.values())
    assert time.monotonic() - t0 < 60
    out = {}
    for (name, (_, word)), res in zip(cases.items(), results, strict=True):
        assert not res.passed, f"{name} passed: {res}"
        assert word in res.reason, f"{name}: {res.reason}"
        out[name] = (res.passed, res.reason)
    return out


def test_hostile_completions_fail_and_leave_nothing(env: dict[str, Path]) -> None:
    with Sandbox(Limits(timeout_s=3.0, memory_bytes=GiB // 2)) as sb:
        info = sb.describe()
        reasons = run_hostile(sb, env)
        # the machine is as it was: the executor still serves, nothing written, nothing running
        assert sb.run(TASK.program("    return 1\n")).passed
    assert reasons["fork bomb"][1], reasons
    assert not (env["outside"] / "pwned").exists()
    assert not (ROOT / f"{MARK}-written").exists()
    time.sleep(0.2)
    assert leftovers() == []
    if info["isolation"] == "bwrap":
        assert info["network"] == "none" and info["fork_bound"] and info["pid_namespace"]
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("uff-eval-*") if str(os.getpid()) in p.name]


def test_default_limits_and_isolation_is_reported() -> None:
    lim = Limits()
    assert lim.memory_bytes == 4 * GiB and lim.timeout_s > 0
    with Sandbox(workers=1) as sb:
        res = sb.run("print('hello')\n")
        assert res.passed and res.isolation == sb.isolation
        assert sb.describe()["isolation"] in ("bwrap", "unshare", "rlimits")
    with pytest.raises(ValueError, match="isolation: expected auto or one of"):
        Sandbox(isolation="docker")
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=1)


@pytest.mark.parametrize("level", ["unshare", "rlimits"])
def test_fallback_levels_still_judge_and_contain(level: str, env: dict[str, Path]) -> None:
    """Lower levels: no filesystem isolation (said so), but limits, scrubbed env and the sweep hold."""
    try:
        sb = Sandbox(Limits(timeout_s=2.0, memory_bytes=1 * GiB), isolation=level, workers=2)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with sb:
        info = sb.describe()
        assert info["isolation"] == level and "host" in info["filesystem"]
        safe = {k: v for k, v in hostile(env).items()
                if k in ("infinite loop", "memory bomb", "env secret", "read ~/.aws", "exit early", "hard exit",
                         "escape the group")
                or (k == "fork bomb" and info["fork_bound"])
                or (k.startswith("socket") and level == "unshare")}
        results = sb.run_many(TASK.program(body) for body, _ in safe.values())
        for (name, (_, word)), res in zip(safe.items(), results, strict=True):
            assert not res.passed and word in res.reason, (name, res)
            assert res.isolation == level
        assert sb.run(TASK.program("    return 1\n")).passed
    time.sleep(0.2)
    assert leftovers() == []


def test_a_callback_that_raises_cancels_the_samples_not_yet_started() -> None:
    seen: list[int] = []

    def stop_early(i: int, _res: object) -> None:
        seen.append(i)
        raise KeyboardInterrupt("abandon")

    with Sandbox(workers=1) as sb:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            sb.run_many(["import time; time.sleep(0.2)"] * 50, on_done=stop_early)
        assert len(seen) <= 2 and time.monotonic() - t0 < 5  # the one running meanwhile may end too
