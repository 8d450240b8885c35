"""What a user sees from `uff-port train` in a terminal: a real pseudo-terminal, the real CLI and trainer."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
SMALL = ["--set", "training.max_steps=6", "--set", "checkpoint.every_steps=3", "--set", "eval.every_steps=3",
         "--set", "data.seq_len=128", "--set", "eval.max_batches=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("UFF_PORT_CACHE", str(tmp_path_factory.getbasetemp() / "uff-cache"))
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TERM="xterm-256color", PYTHONWARNINGS="default")
    e.pop("NO_COLOR", None)
    e.pop("COLUMNS", None)
    return e


def screen(raw: bytes) -> list[str]:
    """The lines as a terminal leaves them: escapes dropped, each line what its last redraw wrote."""
    text = ANSI.sub("", raw.decode("utf-8", "replace"))
    out = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        out.append(parts[-1].rstrip() if parts else "")
    return out


def in_pty(args: list[str], env: dict[str, str], cwd: Path, *, cols: int = 120, timeout: float = 240,
           on_output: Callable[[bytes, int], bool] | None = None) -> tuple[int, bytes]:
    """Run `uff-port ARGS` on a pseudo-terminal; `on_output(seen, pid)` may act once (returns True when it has)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([PY, "-m", "uff_port.cli", *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                            cwd=cwd, start_new_session=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            seen += data
            if on_output is not None and on_output(seen, proc.pid):
                on_output = None
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, seen


def test_a_finished_run_reads_cleanly(tmp_path: Path, env: dict[str, str]) -> None:
    run = tmp_path / "run"
    code, raw = in_pty(["train", "tiny", "--run-dir", str(run), *SMALL], env, tmp_path)
    lines = screen(raw)
    text = "\n".join(lines)
    assert code == 0, text[-3000:]
    # A compact config line first.
    assert lines[0].startswith("tiny: builtin:tiny-llama · LoRA r16 · 6 steps of 4x2 seqs of 128 tokens"), lines[0]
    # Library warnings went to the run's log, not the terminal.
    assert "Warning" not in text and "warnings.warn" not in text
    log = (run / "trainer.log").read_text()
    for noise in (ln.strip() for ln in log.splitlines() if ln.strip()):
        assert noise not in text
    # Numbers rounded: no loss or perplexity with more than 4 significant digits.
    assert not re.search(r"\d\.\d{5,}", text), re.findall(r".*\d\.\d{5,}.*", text)
    assert re.search(r"eval +step 3: loss \d\.\d{3}, perplexity \d+(\.\d+)?$", text, re.M)
    # The bar has labelled elapsed and remaining times, and ends on a done state.
    bars = [ln for ln in lines if re.match(r"^(loading|training|evaluating|saving|done|checkpointing)\s", ln)]
    assert bars and all("elapsed" in b and "remaining" in b for b in bars)
    assert bars[-1].startswith("done") and "6/6" in bars[-1]
    # The summary: wall time, tokens, steps, best eval, peak memory, artifact id, what to do next.
    summary = text[text.index("\ndone: "):]
    assert re.search(r"done: 6 steps in \d+s · [\d,]+ tokens seen · final loss \d\.\d{3} · "
                     r"best eval loss \d\.\d{3} \(step [36]\) · peak RAM [\d,]+ MiB", summary), summary
    assert re.search(r"adapter: +\S+/final +\(artifact [0-9a-f]{12}\)", summary)
    for cmd in ("uff-port generate", "uff-port chat", "uff-port merge", "uff-port register", "uff-port eval"):
        assert f"  {cmd} {run}" in summary


def test_an_error_is_printed_once(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "nowhere.jsonl"
    for quiet in ([], ["--quiet"]):
        code, raw = in_pty(["train", "tiny", "--run-dir", str(tmp_path / f"r{len(quiet)}"), *SMALL,
                            "--set", f"data.path={missing}", *quiet], env, tmp_path)
        text = "\n".join(screen(raw))
        assert code == 3, text
        assert text.count(str(missing)) == 1, text
        assert text.count("failed (") == 1 and "Traceback" not in text


@pytest.mark.slow
def test_a_crash_without_a_word_shows_the_end_of_the_log(tmp_path: Path, env: dict[str, str]) -> None:
    """A trainer that dies without a `failed` event: the user is pointed at the log, once."""
    def kill_trainer(seen: bytes, pid: int) -> bool:
        if not re.search(r"\b[1-9]/400\b", ANSI.sub("", seen.decode("utf-8", "replace"))):
            return False
        import psutil

        for child in psutil.Process(pid).children(recursive=True):
            child.kill()
        return True

    slow = [*SMALL, "--set", "training.max_steps=400", "--set", "training.progress_every_seconds=0"]
    code, raw = in_pty(["train", "tiny", "--run-dir", str(tmp_path / "run"), *slow], env, tmp_path,
                       on_output=kill_trainer)
    text = "\n".join(screen(raw))
    assert code == 128 + signal.SIGKILL, text
    assert text.count("trainer exited with status -9 without saying why") == 1
    assert "trainer.log" in text


@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint_and_says_how_to_go_on(tmp_path: Path, env: dict[str, str]) -> None:
    def interrupt(seen: bytes, pid: int) -> bool:
        if not re.search(r"\b[2-9]/400\b", ANSI.sub("", seen.decode("utf-8", "replace"))):
            return False
        os.killpg(pid, signal.SIGINT)  # what Ctrl-C sends: the CLI and the trainer alike
        return True

    run = tmp_path / "run"
    slow = [*SMALL, "--set", "training.max_steps=400", "--set", "training.progress_every_seconds=0"]
    code, raw = in_pty(["train", "tiny", "--run-dir", str(run), *slow], env, tmp_path, on_output=interrupt)
    text = "\n".join(screen(raw))
    assert code == 75, text[-3000:]
    assert re.search(rf"stopped at step \d+ after \d+s, with a checkpoint; continue with: uff-port resume {run}", text)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
