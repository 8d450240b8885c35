"""Code evaluation inside a training run (`eval.suites`), on the model in memory.

At the steps a suite asks for (its `every_steps`, else the loss evaluation's)
and at the end, each suite is generated greedily by the model being trained
and run in the sandbox; the results go to `RUN_DIR/eval/<suite>.json` (so the
artifact manifest carries them) and an `eval` event carries `suite`, `pass@1`
and `by_manager`. Between generation batches and while samples run, `poll`
answers the trainer's control channel; a stop abandons the evaluation at once
(the trainer then checkpoints as for any stop, so nothing else is lost).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from uff_port.eval.generate import GenConfig, generate
from uff_port.eval.runner import Sample, evaluate
from uff_port.eval.sandbox import Limits, Sandbox
from uff_port.eval.suites import Suite, load_suite


class Abandoned(Exception):
    """A stop arrived while a suite was being evaluated."""


def due(spec: Any, step: int, loss_every: int | None, final: bool) -> bool:
    every = spec.every_steps or loss_every
    return final or bool(every and step % every == 0)


def sampled(suite: Suite, sample: int | None) -> Suite:
    """A fixed subset (seeded by the suite's digest), the same at every step, so steps compare."""
    if not sample or sample >= len(suite.tasks):
        return suite
    picked = sorted(random.Random(suite.digest).sample(range(len(suite.tasks)), sample))
    return Suite(suite.name, suite.source, tuple(suite.tasks[i] for i in picked))


def run_suites(specs: Sequence[Any], run_dir: Path, model: Any, tokenizer: Any, device: Any, step: int,
               loss_every: int | None, final: bool, emit: Callable[..., None],
               poll: Callable[[], int], stop_level: int, loss: float | None = None) -> int:
    """Evaluate the suites due at `step`; return the strongest control word `poll` saw."""
    seen = [0]
    last = [0.0]

    def check(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last[0] >= 0.2:
            last[0] = now
            seen[0] = max(seen[0], poll())
            if seen[0] >= stop_level:
                raise Abandoned()

    was_training = bool(getattr(model, "training", False))
    model.eval()
    padding_side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        for spec in specs:
            if not due(spec, step, loss_every, final):
                continue
            suite = sampled(load_suite(spec.suite), spec.sample)
            gen = GenConfig(max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size)
            check(force=True)
            comps = generate(model, tokenizer, [t.prompt for t in suite.tasks], gen, str(device),
                             on_batch=lambda _rows: check())
            samples = [Sample(t.task_id, 0, row[0]) for t, row in zip(suite.tasks, comps, strict=True)]
            with Sandbox(Limits(timeout_s=spec.timeout)) as sandbox:
                res = evaluate(suite, samples, sandbox, Path(run_dir) / "eval" / f"{suite.name}.json",
                               [1], meta={"target": str(run_dir), "step": step},
                               progress=lambda _d, _t: check())
            emit("eval", step=step, suite=suite.name, tasks=res["tasks"], loss=loss,
                 **{"pass@1": res["metrics"]["pass@1"]},
                 by_manager={m: r["pass@1"] for m, r in res["by_manager"].items()},
                 results=str(Path(run_dir) / "eval" / f"{suite.name}.json"))
    except Abandoned:
        emit("log", level="warning", message=f"code evaluation abandoned at step {step}: stop requested")
    finally:
        tokenizer.padding_side, tokenizer.pad_token = padding_side, pad
        if was_training:
            model.train()
    return seen[0]
