"""scripts/bench_all.py re-measures into its own marked sections and leaves the hand-written doc alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = re.compile(r"<!-- BEGIN (\S+) -->\n(.*?)<!-- END \1 -->", re.S)
FAST = ["bench_config", "bench_protocol", "bench_registry"]  # torch-free: seconds


def sections(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in SECTION.finditer(text)}


def hand_written(text: str) -> str:
    return SECTION.sub("", text)


def run_quick(tmp_path: Path, only: list[str] | None) -> tuple[subprocess.CompletedProcess[str], str, str]:
    doc = tmp_path / "benchmarks.md"
    before = DOC.read_text(encoding="utf-8")
    doc.write_text(before, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "scripts" / "bench_all.py"), "--quick", "--doc", str(doc),
            "--log", str(tmp_path / "bench.log")]
    if only:
        argv += ["--only", ",".join(only)]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    return proc, before, doc.read_text(encoding="utf-8")


def check(before: str, after: str, measured: list[str], skipped: tuple[str, ...] = ()) -> None:
    assert hand_written(after) == hand_written(before), "bench_all rewrote hand-written text"
    old, new = sections(before), sections(after)
    assert set(new) == set(old), "a section was added or lost"
    for name in measured:
        assert "Measured by `python scripts/bench_all.py --quick`" in new[name], name
        assert "load average" in new[name] and "FAILED" not in new[name], new[name]
        assert new[name] != old[name]
    for name in set(old) - set(measured) - set(skipped) - {"bench_all"}:
        assert new[name] == old[name], f"{name} was not asked for but changed"
    header = new["bench_all"]
    assert f"{os.cpu_count()} CPU cores" in header and "Load average" in header and "Quick mode" in header


def test_quick_run_replaces_only_its_sections(tmp_path: Path) -> None:
    proc, before, after = run_quick(tmp_path, FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(before, after, FAST)
    assert "| parse (file -> tree) |" in sections(after)["bench_config"]
    assert re.search(r"ping/echo p50 ratio: median of 3 rounds [\d.]+x \(min", sections(after)["bench_protocol"])
    assert sections(after)["bench_registry"].count("**") >= 8  # four rows, each a median with its spread


def test_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_all.py"), "--only", "bench_nope",
                           "--doc", str(tmp_path / "b.md")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bench_nope" in proc.stderr
    assert not (tmp_path / "b.md").exists()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1900)
def test_quick_run_of_every_benchmark(tmp_path: Path) -> None:
    """Every script bench_all knows runs to the end in quick mode (minutes: each loads torch)."""
    proc, before, after = run_quick(tmp_path, None)
    assert proc.returncode == 0, proc.stderr[-3000:] + (tmp_path / "bench.log").read_text()[-5000:]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_all
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    runnable = [b.name for b in bench_all.BENCHES if bench_all.missing(b) is None]
    check(before, after, runnable, tuple(b.name for b in bench_all.BENCHES if b.name not in runnable))
    for b in bench_all.BENCHES:
        if b.name not in runnable:  # a missing prerequisite is said, not hidden
            assert "Not measured by this invocation" in sections(after)[b.name]
