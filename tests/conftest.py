"""Shared fixtures: a real worker process speaking real frames."""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from uff_port.client import WorkerClient

# One OpenMP thread per process: the suite runs two test processes on two cores, and
# torch's default (a thread per core) makes every trainer it starts spin-wait on the
# other's threads: a 40-step tiny run took 61 s that way against 24 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`long` tests (minutes each) stay out of CI's run, which must stay within its time budget;
    `bash scripts/test.sh` on a developer's machine runs them (UFF_PORT_LONG=1 forces them anywhere)."""
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not ci or os.environ.get("UFF_PORT_LONG") == "1":
        return
    skip = pytest.mark.skip(reason="long test: skipped when CI=true (UFF_PORT_LONG=1 runs it)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
PYTHON = sys.executable


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture
def worker(runs_root: Path) -> Iterator[WorkerClient]:
    env = dict(os.environ)
    client = WorkerClient(runs_root=runs_root, heartbeat_interval=0.2, env=env)
    try:
        yield client
    finally:
        if client.proc.poll() is None:
            client.close_stdin()
            try:
                client.proc.wait(30)
            except Exception:
                client.kill()


@pytest.fixture
def wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in wheel for cloud bundles (set as UFF_PORT_WHEEL), so no real wheel is built."""
    path = tmp_path / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")
    monkeypatch.setenv("UFF_PORT_WHEEL", str(path))
    return path
