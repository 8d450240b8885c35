"""A cloud session's events, merged into the local run's events.jsonl.

The artifact manifest of a run (metrics, final_step, attempts) is read from
its events.jsonl; a cloud run's training happened remotely, so each verified
session's events come home and are appended here, tagged `session` and `seq`
(the line's position among that session's events). A session pulled twice, or
a merge cut short by a crash, never duplicates a line: (session, seq) pairs
already present are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from uff_port.training.reporting import EVENTS_FILE


def session_events(pulled_run: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The session's own events: those after `offset` bytes (SageMaker keeps earlier sessions' too)."""
    path = pulled_run / EVENTS_FILE
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(max(0, offset))
        data = fh.read()
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed trainer
        if isinstance(ev, dict) and isinstance(ev.get("event"), str):
            out.append(ev)
    return out


def _present(path: Path) -> set[tuple[str, int]]:
    keys: set[tuple[str, int]] = set()
    if not path.is_file():
        return keys
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if '"session"' not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("session"), str) and isinstance(ev.get("seq"), int):
                keys.add((ev["session"], ev["seq"]))
    return keys


def merge_events(run_dir: Path, pulled_run: Path, session: str, run_id: str, offset: int = 0) -> int:
    """Append the session's events not yet merged; returns how many were added (fsynced)."""
    target = run_dir / EVENTS_FILE
    have = _present(target)
    lines = []
    for seq, ev in enumerate(session_events(pulled_run, offset)):
        if (session, seq) in have:
            continue
        ev = {**ev, "session": session, "seq": seq}
        ev.setdefault("job_id", run_id)
        lines.append(json.dumps(ev, separators=(",", ":"), default=str) + "\n")
    if not lines:
        return 0
    with open(target, "ab") as fh:
        if fh.tell() > 0:
            with open(target, "rb") as rd:
                rd.seek(-1, os.SEEK_END)
                if rd.read(1) != b"\n":
                    fh.write(b"\n")  # seal a torn line before ours
        fh.write("".join(lines).encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    return len(lines)
