"""Put a benchmark script's table into a doc without touching anything else in it.

A script owns only the text between `<!-- BEGIN NAME -->` and `<!-- END NAME -->`
(NAME: the script's name). `replace_section` swaps that text; if the doc has no
such section yet, it is appended at the end. Hand-written text is never rewritten.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def replace_section(path: Path, name: str, body: str) -> None:
    """Write `body` as the section `name` of `path` (created, or appended, if missing)."""
    begin, end = markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if len(pattern.findall(old)) > 1:
        raise ValueError(f"{path}: the section {name} appears more than once; fix it by hand")
    if pattern.search(old):
        new = pattern.sub(lambda _m: block, old, count=1)
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + ("\n" if old else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
