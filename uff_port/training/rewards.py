"""Reward functions of the RL stage, by name, from the evaluator (docs/rl.md, "Rewards").

A reward maps (task, completion) to a score; the total reward of a completion
is the weighted sum over `rl.rewards`. The functions are the evaluator's:

- `tests`: the task's tests run on the completion in the evaluator's sandbox
  (`uff_port.eval.sandbox`), all completions of a batch in parallel over
  `rl.reward_workers` executors; 1.0 when the program ran to its end, else 0.
- `parses`, `forbidden`: the evaluator's scorers (compile / parse only: nothing runs).
- `length`: 1.0 within `budget` characters; with `shaped: true`, budget/length beyond it,
  so a run that starts far over budget still has a slope to climb.
- `format`: 1.0 when the regular expression `pattern` is found (`mode: search`) or
  matches the whole completion (`mode: fullmatch`).
- anything else: a plug-in scorer (`module:function`, `file.py:function`, an entry
  point of `uff_port.eval.scorers`), run in the trainer's process: it is the user's
  code, reading the completion as text, never executing it.

Every reward is deterministic given the completion (the sandbox's verdict is a
pass/fail of a program, not a timing), which is what lets a resumed run recompute
nothing and still match.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uff_port.core.config import RewardSpec, RLConfig
from uff_port.eval.scoring import BUILTIN, Scorer, load_scorer
from uff_port.eval.suites import Task


class RewardError(ValueError):
    """A reward function that cannot be built (a plug-in that does not import)."""


@dataclass(frozen=True)
class RewardFn:
    name: str
    weight: float
    scorer: Scorer | None
    """None for `tests`, which runs in the sandbox for the whole batch at once."""


def _length(budget: int, shaped: bool) -> Scorer:
    def score(task: Task, completion: str) -> tuple[float, str]:
        n = len(completion)
        if n <= budget:
            return 1.0, f"{n} <= {budget} chars"
        return (budget / n if shaped else 0.0), f"{n} > {budget} chars"

    return Scorer("length", score)


def _format(pattern: str, mode: str) -> Scorer:
    rx = re.compile(pattern)
    match = rx.fullmatch if mode == "fullmatch" else rx.search

    def score(task: Task, completion: str) -> tuple[float, str]:
        return (1.0, "matches") if match(completion) else (0.0, "no match")

    return Scorer("format", score)


def build(spec: RewardSpec) -> RewardFn:
    o = spec.options
    if spec.name == "tests":
        return RewardFn("tests", spec.weight, None)
    if spec.name == "length":
        return RewardFn("length", spec.weight, _length(int(o.get("budget", 4000)), bool(o.get("shaped", False))))
    if spec.name == "format":
        return RewardFn("format", spec.weight, _format(str(o["pattern"]), str(o.get("mode", "search"))))
    if spec.name in BUILTIN:
        return RewardFn(spec.name, spec.weight, BUILTIN[spec.name]())
    try:
        scorer = load_scorer(spec.name)
    except ValueError as exc:
        raise RewardError(f"rl.rewards: {exc}") from None
    return RewardFn(scorer.name, spec.weight, scorer)


class Rewards:
    """The configured reward functions and, when `tests` is one of them, a sandbox."""

    def __init__(self, cfg: RLConfig) -> None:
        self.fns = [build(s) for s in cfg.rewards]
        names = [f.name for f in self.fns]
        if len(set(names)) != len(names):
            raise RewardError(f"rl.rewards: a reward function is named twice in {names}")
        self.sandbox: Any = None
        if any(f.scorer is None for f in self.fns):
            from uff_port.eval.sandbox import Limits, Sandbox

            self.sandbox = Sandbox(Limits(timeout_s=cfg.reward_timeout), workers=cfg.reward_workers)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fns]

    def score(self, tasks: Sequence[Task], completions: Sequence[str],
              on_done: Any = None) -> tuple[list[float], dict[str, list[float]], list[bool | None]]:
        """(total reward per completion, each function's scores, tests passed or None).

        `on_done(i)` runs as each sandboxed program finishes; raising from it abandons
        the batch (the sandbox cancels what has not started).
        """
        per: dict[str, list[float]] = {}
        passed: list[bool | None] = [None] * len(completions)
        for fn in self.fns:
            if fn.scorer is None:
                results = self.sandbox.run_many(
                    [t.program(c) for t, c in zip(tasks, completions, strict=True)],
                    on_done=(lambda i, _r: on_done(i)) if on_done is not None else None,
                )
                passed = [r.passed for r in results]
                per[fn.name] = [1.0 if r.passed else 0.0 for r in results]
            else:
                per[fn.name] = [fn.scorer(t, c)[0] for t, c in zip(tasks, completions, strict=True)]
        totals = [math.fsum(fn.weight * per[fn.name][i] for fn in self.fns) for i in range(len(completions))]
        return totals, per, passed

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
