"""Loss-continuity guard: silent on a faithful resume, one warning on a jump."""

from __future__ import annotations

import math
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from uff_port.training.continuity import (
    AFTER_STEPS,
    COUNTER_KEY,
    ContinuityGuard,
    LossWindow,
    detect_jump,
)


def noisy(mean: float, n: int, spread: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.uniform(-spread, spread) for _ in range(n)]


def test_window_keeps_last_finite_losses_and_round_trips_counters() -> None:
    window = LossWindow(size=4)
    for v in (5.0, float("nan"), 4.0, 3.0, float("inf"), 2.0, 1.0):
        window.add(v)
    assert window.values() == [4.0, 3.0, 2.0, 1.0]
    counters = {COUNTER_KEY: window.to_counters(), "tokens": 10}
    assert LossWindow.from_counters(counters, size=4).values() == window.values()
    assert LossWindow.from_counters({}).values() == []


def test_faithful_resume_is_silent_and_jump_warns_once() -> None:
    before = noisy(2.0, 32, 0.05, 1)
    events: list[tuple[str, dict[str, Any]]] = []
    quiet = ContinuityGuard(before, 100, emit=lambda e, **f: events.append((e, f)))
    for v in noisy(1.98, 10, 0.05, 2):
        quiet.observe(v)
    assert quiet.done and quiet.jump is None and events == []

    loud = ContinuityGuard(before, 100, emit=lambda e, **f: events.append((e, f)))
    results = [loud.observe(v) for v in noisy(6.5, 10, 0.05, 3)]  # an optimizer reset looks like this
    assert sum(r is not None for r in results) == 1 and results[AFTER_STEPS - 1] is not None
    (event,) = events
    assert event[0] == "log" and event[1]["level"] == "warning" and event[1]["code"] == "loss_discontinuity"
    assert "step 100" in event[1]["message"] and event[1]["after_mean"] > 6


def test_nan_after_resume_is_a_jump_with_nil_mean() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    guard = ContinuityGuard(noisy(2.0, 8, 0.1, 4), 7, emit=lambda e, **f: events.append((e, f)), after_steps=2)
    guard.observe(2.0)
    assert guard.observe(float("nan")) is not None
    assert events[0][1]["after_mean"] is None  # non-finite floats never go on the wire


def test_no_window_means_no_verdict() -> None:
    guard = ContinuityGuard([], 5)
    assert all(guard.observe(100.0) is None for _ in range(10))
    assert detect_jump([1.0], [50.0]) is None


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


@given(before=st.lists(st.floats(), max_size=40), after=st.lists(st.floats(), max_size=10))
def test_detect_jump_never_raises(before: list[float], after: list[float]) -> None:
    jump = detect_jump(before, after)
    if jump is not None:
        assert math.isfinite(jump.before_mean) or not all(math.isfinite(x) for x in before)


@given(before=st.lists(finite, min_size=2, max_size=40), k=st.integers(1, 8))
def test_continuing_at_the_level_never_jumps(before: list[float], k: int) -> None:
    recent = before[-8:]
    assert detect_jump(before, [sum(recent) / len(recent)] * k) is None


@given(before=st.lists(finite, min_size=2, max_size=40), after=st.lists(finite, min_size=1, max_size=8))
def test_falling_losses_never_jump(before: list[float], after: list[float]) -> None:
    floor = min(before)
    assert detect_jump(before, [min(a, floor) for a in after]) is None


def test_a_steadily_falling_run_resumed_exactly_is_silent() -> None:
    run = [3.0 - 0.05 * i + 0.01 * ((-1) ** i) for i in range(40)]
    assert detect_jump(run[:32], run[32:37]) is None
    assert detect_jump(run[:32], [run[31] + 0.5] * 5) is not None  # the same run jumping back up
