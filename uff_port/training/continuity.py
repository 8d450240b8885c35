"""Loss-continuity guard: does training after a resume look like training before it?

An exact resume reproduces the losses bit for bit, but a resume with state not
restored (an optimizer reset, a data cursor at the wrong place, a changed
dataset) shows up as a jump in the first losses. The trainer keeps the recent
losses in the checkpoint's counters (`LossWindow.to_counters`) and, after a
resume, feeds the first new losses to a `ContinuityGuard`, which emits one
`log` warning (code `loss_discontinuity`) if they jump.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

WINDOW: Final = 32
"""Losses kept before a checkpoint."""
AFTER_STEPS: Final = 5
"""Losses after the resume that are compared with that window."""
RECENT: Final = 8
"""The level before the checkpoint is the mean of this many last losses (early losses fall fast)."""
SIGMAS: Final = 4.0
REL_TOLERANCE: Final = 0.05
"""A jump must exceed both SIGMAS step-noise deviations and this share of the level."""
COUNTER_KEY: Final = "loss_window"

Emit = Callable[..., None]


class LossWindow:
    """The last `size` finite losses; stored in trainer_state.json counters."""

    def __init__(self, size: int = WINDOW, values: Iterable[float] = ()) -> None:
        self._values: deque[float] = deque(maxlen=size)
        for v in values:
            self.add(v)

    def add(self, loss: float) -> None:
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self._values.append(float(loss))

    def values(self) -> list[float]:
        return list(self._values)

    def to_counters(self) -> list[float]:
        return self.values()

    @classmethod
    def from_counters(cls, counters: dict[str, Any], size: int = WINDOW) -> LossWindow:
        raw = counters.get(COUNTER_KEY) or []
        return cls(size, [v for v in raw if isinstance(v, (int, float))])


@dataclass
class Jump:
    before_mean: float
    before_std: float
    after_mean: float
    threshold: float

    def message(self, step: int) -> str:
        return (
            f"loss jumped after resuming at step {step}: mean {self.after_mean:.4f} over the first "
            f"losses vs {self.before_mean:.4f} (+/- {self.before_std:.4f}) before the checkpoint; "
            "some training state may not have been restored"
        )


def detect_jump(
    before: list[float], after: list[float], sigmas: float = SIGMAS, rel: float = REL_TOLERANCE
) -> Jump | None:
    """A Jump when the mean of `after` rises above the band over the level before; else None.

    One-sided: a broken resume shows as a rise, and a healthy run still
    falling would otherwise look like a jump down. The noise is estimated from
    step-to-step differences, so a falling trend does not widen the band.
    """
    b = [x for x in before if math.isfinite(x)]
    if len(b) < 2 or not after:
        return None
    recent = b[-RECENT:]
    level = sum(recent) / len(recent)
    diffs = [y - x for x, y in zip(b[:-1], b[1:], strict=True)]
    mean_d = sum(diffs) / len(diffs)
    # no ** : it raises on overflow, where * gives inf
    noise = math.sqrt(sum((d - mean_d) * (d - mean_d) for d in diffs) / max(len(diffs) - 1, 1) / 2)
    threshold = max(sigmas * noise, rel * abs(level))
    if not all(math.isfinite(x) for x in after):
        return Jump(level, noise, math.inf, threshold)  # a NaN/Inf loss is always a jump
    mean_a = sum(after) / len(after)
    if mean_a - level > threshold:
        return Jump(level, noise, mean_a, threshold)
    return None


class ContinuityGuard:
    """Collects the first losses after a resume and warns once if they jump."""

    def __init__(
        self, before: list[float], resumed_step: int, emit: Emit | None = None, after_steps: int = AFTER_STEPS
    ) -> None:
        self.before = list(before)
        self.resumed_step = resumed_step
        self.after_steps = after_steps
        self._emit = emit
        self._after: list[float] = []
        self.done = len(self.before) < 2  # nothing to compare against: stay silent
        self.jump: Jump | None = None

    def observe(self, loss: float) -> Jump | None:
        """Feed one step loss; returns (and emits) the Jump when it is decided."""
        if self.done:
            return None
        self._after.append(float(loss))
        if len(self._after) < self.after_steps:
            return None
        self.done = True
        self.jump = detect_jump(self.before, self._after)
        if self.jump is not None and self._emit is not None:
            self._emit(
                "log",
                level="warning",
                code="loss_discontinuity",
                message=self.jump.message(self.resumed_step),
                step=self.resumed_step,
                before_mean=self.jump.before_mean,
                after_mean=self.jump.after_mean if math.isfinite(self.jump.after_mean) else None,
            )
        return self.jump
