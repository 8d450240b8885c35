"""Paired significance tests: is the candidate better than the baseline on the SAME tasks?

Two models scored on one suite give paired per-task outcomes. With binary
outcomes (greedy pass/fail) the exact McNemar test uses only the discordant
tasks (b: candidate passes, baseline fails; c: the reverse); with fractional
scores (pass rates over n samples) a paired bootstrap resamples tasks. Both are
two-sided; the verdict is `better` / `worse` only when p < alpha.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["better", "worse", "indistinguishable"]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial(b + c, 1/2) tail at min(b, c), doubled."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(a: list[float], b: list[float], iters: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value for mean(a - b) != 0 by resampling tasks with replacement."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap: expected two non-empty lists of equal length")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    observed = sum(diffs) / len(diffs)
    if all(d == diffs[0] for d in diffs):
        return 1.0 if observed == 0 else 0.0
    rng = random.Random(seed)
    n = len(diffs)
    # shift to the null (mean zero) and count resampled means at least as extreme
    centred = [d - observed for d in diffs]
    extreme = 0
    for _ in range(iters):
        m = sum(centred[rng.randrange(n)] for _ in range(n)) / n
        if abs(m) >= abs(observed) - 1e-12:
            extreme += 1
    return (extreme + 1) / (iters + 1)


@dataclass(frozen=True)
class Comparison:
    tasks: int
    candidate: float
    baseline: float
    delta: float
    test: str
    p_value: float
    alpha: float
    verdict: Verdict
    candidate_only: int = 0
    baseline_only: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(candidate: Mapping[str, float], baseline: Mapping[str, float], alpha: float = 0.05,
            iters: int = 10_000, seed: int = 0) -> Comparison:
    """Per-task scores in [0, 1] keyed by task_id; both must cover the same tasks."""
    if set(candidate) != set(baseline):
        only_c = sorted(set(candidate) - set(baseline))
        only_b = sorted(set(baseline) - set(candidate))
        raise ValueError(f"compare: the two results cover different tasks (candidate only: "
                         f"{only_c[:3]}, baseline only: {only_b[:3]}); evaluate both on one suite")
    if not candidate:
        raise ValueError("compare: no tasks")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected 0 < alpha < 1, got {alpha}")
    ids = sorted(candidate)
    a = [float(candidate[t]) for t in ids]
    b = [float(baseline[t]) for t in ids]
    binary = all(x in (0.0, 1.0) for x in a + b)
    if binary:
        better = sum(1 for x, y in zip(a, b, strict=True) if x > y)
        worse = sum(1 for x, y in zip(a, b, strict=True) if x < y)
        p, test = mcnemar_exact(better, worse), "mcnemar-exact"
        extra = {"candidate_only": better, "baseline_only": worse}
    else:
        p, test = paired_bootstrap(a, b, iters, seed), f"paired-bootstrap({iters})"
        extra = {}
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    delta = ma - mb
    verdict: Verdict = "indistinguishable"
    if p < alpha and delta != 0:
        verdict = "better" if delta > 0 else "worse"
    return Comparison(len(ids), ma, mb, delta, test, p, alpha, verdict, **extra)
