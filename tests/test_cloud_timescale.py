"""Compressed time (uff_port.cloud.timescale): only simulations set it; the week's plan and budgets follow it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.campaign.commands import campaign_plan
from uff_port.cloud.backends.base import RemoteStatus, SessionSpec
from uff_port.cloud.timescale import ScaledBackend, now, time_scale


def test_unset_is_the_wall_clock_and_a_bad_scale_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UFF_PORT_TIME_SCALE", raising=False)
    assert time_scale() is None and abs(now() - time.time()) < 1.0
    for bad in ("0", "-2", "nan", "fast"):
        monkeypatch.setenv("UFF_PORT_TIME_SCALE", bad)
        with pytest.raises(ValueError, match="UFF_PORT_TIME_SCALE"):
            time_scale()


def test_scaled_clock_runs_from_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    origin = time.time() - 2.0
    monkeypatch.setenv("UFF_PORT_TIME_SCALE", "1200")  # 3 real seconds per simulated hour
    monkeypatch.setenv("UFF_PORT_TIME_ORIGIN", str(origin))
    monkeypatch.setenv("UFF_PORT_TIME_START", "1796428800")  # a Monday 00:00 UTC
    t = now()
    assert 1796428800 + 2.0 * 1200 <= t <= 1796428800 + 3.0 * 1200


class _Fake:
    name = "kaggle"

    def __init__(self) -> None:
        self.specs: list[SessionSpec] = []

    def find(self, spec: SessionSpec) -> str | None:
        self.specs.append(spec)
        return None

    def submit(self, spec: SessionSpec) -> str:
        self.specs.append(spec)
        return "ref"

    def status(self, ref: str) -> RemoteStatus:
        return RemoteStatus("complete", "", 6.0, 100.0, 106.0)

    def stop(self, ref: str) -> None:
        pass

    def pull(self, ref: str, dest: Path) -> None:
        pass


def test_scaled_backend_shrinks_budgets_out_and_grows_bills_back(tmp_path: Path) -> None:
    inner = _Fake()
    b = ScaledBackend(inner, 1200.0)
    spec = SessionSpec(run_id="r", name="s", index=0, bundle_dir=tmp_path, budget_seconds=9 * 3600.0,
                       margin_seconds=1800.0)
    b.submit(spec)
    assert inner.specs[0].budget_seconds == 27.0 and inner.specs[0].margin_seconds == 1.5
    st = b.status("ref")
    # 6 real seconds billed are 2 simulated hours; the provider's real timestamps are dropped
    assert st.billed_seconds == 7200.0 and st.started_ts is None and st.ended_ts is None


class Ctx:
    def __init__(self, root: Path) -> None:
        self.runs_root = root

    def emit(self, event: str, **fields: Any) -> None:
        pass


def test_the_plan_places_the_simulated_week(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UFF_PORT_TIME_SCALE", "1200")
    monkeypatch.setenv("UFF_PORT_TIME_ORIGIN", str(time.time()))
    monkeypatch.setenv("UFF_PORT_TIME_START", "1796428800")
    spec = {"name": "w", "strategy": "hybrid",
            "models": [{"name": "main", "preset": "tiny", "hours": 8, "overrides": {"training.max_steps": 4}}]}
    plan = campaign_plan({"spec": spec}, Ctx(tmp_path))
    starts = [e["start"] for e in plan["placement"]["entries"]]
    assert starts and 1796428800 <= min(starts) < 1796428800 + 3600
