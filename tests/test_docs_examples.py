"""Every shell, Python and Elixir example in README.md and docs/*.md runs as written.

Fenced blocks tagged bash/sh/shell, python or elixir are examples; untagged
blocks are output or diagrams, and yaml/json/toml blocks are data. The line
before an example may say how it runs:

    <!-- run: slow -->            it trains a model: marked `slow`, with a longer timeout (CI runs it too,
                                  so it trains a few dozen steps, not a whole preset)
    <!-- not-run: REASON -->      cannot run here (a GPU, credentials, the network); REASON is required

Each example runs in a fresh copy of this checkout (its tracked files, with
`.venv` linking to the interpreter running the tests): shell blocks with
`bash -e` in the copy's root, Python blocks with `python -c`, Elixir blocks
with `mix run -e` in its `elixir_bridge/`. Examples that share names (`w`, a run
directory) belong in one block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "elixir": "elixir"}
ANNOTATION = re.compile(r"^<!--\s*(not-run|run)\s*:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")
VENV = Path(sys.executable).parent.parent
FAST_TIMEOUT = 60
SLOW_TIMEOUT = 300


@dataclass(frozen=True)
class Example:
    doc: str
    line: int
    lang: str
    code: str
    mode: str  # "run", "slow" or "skip"
    reason: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def parse(path: Path, root: Path = ROOT) -> list[Example]:
    """The tagged examples of one markdown file, each with the annotation on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Example] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path.name}:{i + 1}: a code fence that is never closed"
        lang = LANGS.get(m.group(1).lower())
        if lang is not None:
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            note = ANNOTATION.match(prev)
            mode, reason = "run", ""
            if note and note.group(1) == "not-run":
                mode, reason = "skip", note.group(2)
            elif note and note.group(2) == "slow":
                mode = "slow"
            elif note:
                raise AssertionError(f"{path.name}:{i + 1}: unknown annotation {prev!r}")
            rel = str(path.relative_to(root))
            out.append(Example(rel, i + 1, lang, "\n".join(lines[i + 1 : end]) + "\n", mode, reason))
        i = end + 1
    return out


EXAMPLES = [e for doc in DOCS for e in parse(doc)]


def test_every_example_runs_or_says_why_not() -> None:
    assert len(EXAMPLES) >= 10, "the parser lost the examples"
    assert all(e.reason.strip() for e in EXAMPLES if e.mode == "skip"), "a not-run example must say why"
    assert any(e.mode == "run" for e in EXAMPLES) and any(e.mode == "slow" for e in EXAMPLES)


def test_the_parser_reads_annotations(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```\nout\n```\n<!-- not-run: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
                   "<!-- run: slow -->\n\n```python\nprint(1)\n```\n```yaml\na: 1\n```\n```elixir\n1 + 1\n```\n")
    got = [(e.line, e.lang, e.mode, e.reason, e.code) for e in parse(doc, tmp_path)]
    assert got == [(7, "shell", "skip", "needs a GPU", "nvidia-smi\n"), (13, "python", "slow", "", "print(1)\n"),
                   (19, "elixir", "run", "", "1 + 1\n")]


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [f for f in out.stdout.decode().split("\0") if f]


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    return _tracked_files()


@pytest.fixture(scope="module")
def elixir_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the first Elixir example leaves the compiled bridge for the others (saves a compile per example)."""
    return tmp_path_factory.mktemp("elixir-build")


def fresh_checkout(dest: Path, files: list[str]) -> Path:
    """A copy of the checkout's tracked files, as a fresh clone has them, plus `.venv`."""
    for rel in files:
        src = ROOT / rel
        if not src.is_file() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    (dest / ".venv").symlink_to(VENV)
    return dest


def example_env(checkout: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(checkout),  # this checkout's package, not an installed copy
        UFF_PORT_PYTHON=str(VENV / "bin" / "python"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MIX_ENV="dev",
    )
    env.setdefault("UFF_PORT_CACHE", str(Path.home() / ".cache" / "uff-port"))
    for name in ("UFF_PORT_REGISTRY", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    return env


def run_example(example: Example, checkout: Path, timeout: float,
                build_cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run one example; Elixir ones reuse `build_cache` (the bridge compiled once) when given."""
    env = example_env(checkout)
    if example.lang == "shell":
        argv, cwd = ["bash", "-e", "-c", example.code], checkout
    elif example.lang == "python":
        argv, cwd = [str(VENV / "bin" / "python"), "-c", example.code], checkout
    else:
        bridge = checkout / "elixir_bridge"
        cached = build_cache is not None and (build_cache / "_build").is_dir()
        if cached:  # sources keep their mtimes (copy2), so mix finds the copy up to date
            shutil.copytree(build_cache / "_build", bridge / "_build", symlinks=True)
        subprocess.run(["mix", "compile"], cwd=bridge, env=env, capture_output=True, timeout=300, check=True)
        if build_cache is not None and not cached:
            shutil.copytree(bridge / "_build", build_cache / "_build", symlinks=True)
        argv, cwd = ["mix", "run", "-e", example.code], bridge
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


SECTION = re.compile(r"<!-- BEGIN (\S+) -->.*?<!-- END \1 -->", re.S)


def hand_written(text: str) -> str:
    """A doc without the sections benchmark scripts own."""
    return SECTION.sub("", text)


def _params(mode: str) -> list[object]:
    marks = [pytest.mark.slow, pytest.mark.timeout(SLOW_TIMEOUT + 60)] if mode == "slow" else []
    return [pytest.param(e, id=e.id, marks=marks) for e in EXAMPLES if e.mode == mode]


@pytest.mark.parametrize("example", _params("run") + _params("slow"))
def test_example_runs_as_written(example: Example, tmp_path: Path, tracked: list[str], elixir_build: Path) -> None:
    if example.lang == "elixir" and shutil.which("mix") is None:
        pytest.skip("Elixir is not installed (scripts/bootstrap.sh installs it)")
    checkout = fresh_checkout(tmp_path / "uff-port", tracked)
    before = {p: hand_written(p.read_text()) for p in (checkout / "docs").glob("*.md")}
    proc = run_example(example, checkout, SLOW_TIMEOUT if example.mode == "slow" else FAST_TIMEOUT, elixir_build)
    assert proc.returncode == 0, (
        f"{example.id} ({example.lang}) exited {proc.returncode}\n--- code\n{example.code}"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    # An example never rewrites the hand-written docs (benchmarks edit only their own marked section).
    for path, text in before.items():
        assert hand_written(path.read_text()) == text, f"{example.id} rewrote {path.name}"


def test_a_benchmark_replaces_only_its_own_section(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from doc_section import replace_section
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written\n<!-- BEGIN other -->\nkeep\n<!-- END other -->\nmore text\n")
    replace_section(doc, "bench_x", "| a |\n")  # absent: appended, nothing else touched
    replace_section(doc, "bench_x", "| b |\n")  # present: replaced in place
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written\n<!-- BEGIN other -->\nkeep\n<!-- END other -->\nmore text\n")
    assert text.count("<!-- BEGIN bench_x -->") == 1 and "| b |" in text and "| a |" not in text
