"""Compressed time for simulations and tests only: a week of budgets in minutes.

The cloud runner takes its clock from the wall, so budgets (Kaggle's week,
SageMaker's day) would take a real week to bind. When `UFF_PORT_TIME_SCALE`
is set (simulated seconds per real second; never in production), the worker's
cloud job runs on a clock that reads `UFF_PORT_TIME_START` (unix seconds of
simulated time; default: the origin) at the real instant `UFF_PORT_TIME_ORIGIN`
(unix seconds; default: now) and runs that many times faster, its waits shrink by the same
factor, and each provider session is seen through `ScaledBackend`: the budget
it is given shrinks on the way out and the time it billed grows on the way
back. Every process that reads the two variables shares one simulated time,
so the ledger of a whole campaign adds up. `campaign_plan` places
the week from the same clock. scripts/simulate_campaign.py --week uses it;
docs/campaign.md says how.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

from uff_port.cloud.backends.base import Backend, RemoteStatus, SessionSpec

ENV_SCALE: Final = "UFF_PORT_TIME_SCALE"
ENV_ORIGIN: Final = "UFF_PORT_TIME_ORIGIN"
ENV_START: Final = "UFF_PORT_TIME_START"


def time_scale() -> float | None:
    """The scale from the environment; None when unset (the wall clock), refused when not a positive number."""
    raw = os.environ.get(ENV_SCALE)
    if raw in (None, ""):
        return None
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_SCALE}: expected a positive number, got {raw!r}") from None
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{ENV_SCALE}: expected a positive number, got {raw!r}")
    return scale


class ScaledClock:
    """Unix seconds of simulated time: `start + (now - origin) * scale`."""

    def __init__(self, scale: float, origin: float | None = None, start: float | None = None) -> None:
        self.scale = scale
        env = os.environ.get(ENV_ORIGIN)
        self.origin = origin if origin is not None else float(env) if env else time.time()
        env = os.environ.get(ENV_START)
        self.start = start if start is not None else float(env) if env else self.origin

    def __call__(self) -> float:
        return self.start + (time.time() - self.origin) * self.scale


def now() -> float:
    """Unix seconds: simulated when `UFF_PORT_TIME_SCALE` is set, else the wall clock."""
    scale = time_scale()
    return ScaledClock(scale)() if scale else time.time()


class ScaledBackend:
    """A provider seen through the compressed clock: budgets shrink on the way out, bills grow on the way back."""

    def __init__(self, inner: Backend, scale: float) -> None:
        self.inner, self.scale, self.name = inner, scale, inner.name

    def _spec(self, spec: SessionSpec) -> SessionSpec:
        return replace(spec, budget_seconds=spec.budget_seconds / self.scale,
                       margin_seconds=spec.margin_seconds / self.scale)

    def find(self, spec: SessionSpec) -> str | None:
        return self.inner.find(self._spec(spec))

    def submit(self, spec: SessionSpec) -> str:
        return self.inner.submit(self._spec(spec))

    def status(self, ref: str) -> RemoteStatus:
        st = self.inner.status(ref)
        billed = None if st.billed_seconds is None else st.billed_seconds * self.scale
        # the provider's timestamps are real: the runner falls back to its own (simulated) clock
        return RemoteStatus(st.state, st.detail, billed, None, None)

    def stop(self, ref: str) -> None:
        self.inner.stop(ref)

    def pull(self, ref: str, dest: Path) -> None:
        self.inner.pull(ref, dest)
