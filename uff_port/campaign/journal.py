"""Reading the campaign journal that `UffPort.Campaign` (Elixir) writes.

`<campaign dir>/journal.bin`: append-only, fsynced records, each a 4-byte
big-endian length then one MessagePack map (the wire's framing). The Elixir
side writes a record *before* it acts on the transition it names, so the file
is the campaign's truth. A torn tail (a crash mid-append: a short header, a
short payload, or an undecodable last record) is ignored, as the writer
ignores it on replay; damage before the last record is reported, never
guessed around. This module is read-only: status and charts only.
docs/campaign.md section "Journal" is the contract.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

JOURNAL_NAME: Final = "journal.bin"
RECORD_VERSION: Final = 1
MAX_RECORD_BYTES: Final = 1 << 20
"""A longer record is damage: the writer never writes one."""
MAX_JOURNAL_BYTES: Final = 256 << 20
_HEADER: Final = struct.Struct(">I")

TERMINAL: Final = frozenset({"promoted", "candidate", "refused", "failed", "skipped"})


class JournalError(Exception):
    """A journal that cannot be read: damage before its last record, or not a file."""


@dataclass
class Journal:
    records: list[dict[str, Any]]
    torn_tail_bytes: int = 0
    """Bytes after the last whole record (a crash mid-append); ignored."""
    path: Path | None = None


def read_records(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Decode framed records; return them and the size of an ignored torn tail."""
    records: list[dict[str, Any]] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _HEADER.size:
            return records, end - pos
        (size,) = _HEADER.unpack_from(data, pos)
        if size > MAX_RECORD_BYTES:
            if pos + _HEADER.size + size >= end:  # an announced size reaching past the end: torn
                return records, end - pos
            raise JournalError(f"record {len(records)} at byte {pos}: announces {size} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        body_end = pos + _HEADER.size + size
        if body_end > end:
            return records, end - pos
        last = body_end == end
        try:
            obj = msgpack.unpackb(data[pos + _HEADER.size : body_end], raw=False, strict_map_key=True,
                                  max_bin_len=MAX_RECORD_BYTES, max_str_len=MAX_RECORD_BYTES)
        except Exception as exc:  # noqa: BLE001 - msgpack raises many kinds on garbage
            if last:
                return records, end - pos
            raise JournalError(f"record {len(records)} at byte {pos}: not MessagePack ({type(exc).__name__})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            if last:
                return records, end - pos
            raise JournalError(f"record {len(records)} at byte {pos}: expected a map with a string `kind`")
        records.append(obj)
        pos = body_end
    return records, 0


def load(campaign_dir: str | Path) -> Journal:
    """Read `<campaign_dir>/journal.bin` (no symlink followed, bounded)."""
    path = Path(campaign_dir) / JOURNAL_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise JournalError(f"{campaign_dir}: no campaign journal ({JOURNAL_NAME})") from None
    except OSError as exc:
        raise JournalError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JournalError(f"{path}: not a regular file")
        if st.st_size > MAX_JOURNAL_BYTES:
            raise JournalError(f"{path}: {st.st_size} bytes, over the {MAX_JOURNAL_BYTES}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_JOURNAL_BYTES + 1)
    finally:
        os.close(fd)
    records, torn = read_records(data)
    return Journal(records, torn, path)


@dataclass
class JobView:
    name: str
    role: str = ""
    backend: str = ""
    parent: str | None = None
    state: str = "pending"
    step: int | None = None
    max_steps: int | None = None
    hours_planned: float = 0.0
    reason: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    artifact_id: str | None = None
    verdict: str | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    intervals: list[tuple[float, float | None]] = field(default_factory=list)
    """(start, end) of each training attempt, unix seconds; end None while running."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "intervals" else v) for k, v in self.__dict__.items()}


@dataclass
class CampaignView:
    name: str = ""
    state: str = "unknown"
    started_at: float | None = None
    finished_at: float | None = None
    jobs: dict[str, JobView] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    release: dict[str, Any] | None = None
    starts: int = 0
    """How often the campaign process started on this journal (1 + recoveries)."""
    torn_tail_bytes: int = 0

    def hours_used(self, now: float) -> dict[str, float]:
        used: dict[str, float] = {}
        for j in self.jobs.values():
            for start, end in j.intervals:
                stop = end if end is not None else now
                used[j.backend] = used.get(j.backend, 0.0) + max(0.0, stop - start) / 3600.0
        return used

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "started_at": self.started_at,
            "finished_at": self.finished_at, "starts": self.starts, "budgets": self.budgets,
            "hours_used": self.hours_used(now), "release": self.release,
            "torn_tail_bytes": self.torn_tail_bytes,
            "jobs": [j.to_dict() for j in self.jobs.values()],
        }


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fold(journal: Journal) -> CampaignView:
    """The campaign as its records say: one pass, unknown kinds and fields ignored."""
    view = CampaignView(torn_tail_bytes=journal.torn_tail_bytes)
    last_t = 0.0
    for rec in journal.records:
        kind, t = rec["kind"], _num(rec.get("t")) or last_t
        job_name = rec.get("job")
        job = view.jobs.get(job_name) if isinstance(job_name, str) else None
        if kind == "campaign_started":
            for j in view.jobs.values():  # the previous process died: its jobs stopped with it
                _close(j, last_t)
            view.starts += 1
            if view.started_at is None:
                view.started_at = t
            view.state = "running"
            view.name = str(rec.get("name") or view.name)
            budgets = rec.get("budgets")
            if isinstance(budgets, dict):
                view.budgets = {str(k): float(v) for k, v in budgets.items() if _num(v) is not None}
        elif kind == "plan":
            for j in rec.get("jobs") or []:
                if isinstance(j, dict) and isinstance(j.get("name"), str) and j["name"] not in view.jobs:
                    view.jobs[j["name"]] = JobView(
                        name=j["name"], role=str(j.get("role") or ""), backend=str(j.get("backend") or ""),
                        parent=j.get("parent") if isinstance(j.get("parent"), str) else None,
                        max_steps=j.get("max_steps") if isinstance(j.get("max_steps"), int) else None,
                        hours_planned=_num(j.get("hours")) or 0.0,
                    )
        elif kind == "job" and job is not None:
            state = rec.get("state")
            if isinstance(state, str):
                _close(job, t)
                job.state = state
                job.reason = None  # a reason belongs to the state it came with
                if state in ("training", "training_rl"):  # the sft and rl stages both hold a slot
                    job.attempts += 1
                    job.intervals.append((t, None))
            if isinstance(rec.get("reason"), str):
                job.reason = rec["reason"]
            if isinstance(rec.get("step"), int):
                job.step = rec["step"]
            if isinstance(rec.get("artifact_id"), str):
                job.artifact_id = rec["artifact_id"]
            if isinstance(rec.get("scores"), dict):
                job.scores = rec["scores"]
            if isinstance(rec.get("gates"), list):
                job.gates = [g for g in rec["gates"] if isinstance(g, dict)]
            if state in ("promoted", "candidate", "refused"):
                job.verdict = state
        elif kind == "release" and rec.get("state") == "done":
            view.release = {k: v for k, v in rec.items() if k not in ("kind", "t", "seq")}
        elif kind == "campaign_finished":
            view.state, view.finished_at = "finished", t
            for j in view.jobs.values():
                _close(j, t)
        last_t = max(last_t, t)
    return view


def _close(job: JobView, t: float) -> None:
    if job.intervals and job.intervals[-1][1] is None:
        job.intervals[-1] = (job.intervals[-1][0], t)


def iter_frames(records: list[dict[str, Any]]) -> Iterator[bytes]:
    """Frame records as the Elixir writer does (tests and tools that write journals)."""
    for r in records:
        body = msgpack.packb(r, use_bin_type=True)
        yield _HEADER.pack(len(body)) + body
