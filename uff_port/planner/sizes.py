"""Byte sizes and GPU specs as people type them: `16GiB`, `16GB`, `16G`, `2x16GiB`.

Parsed strictly: a planner that silently read `16` as 16 bytes would answer
the wrong question, so anything ambiguous is an error naming what was expected.
"""

from __future__ import annotations

import re
from typing import Final

GiB: Final = 1024**3
MiB: Final = 1024**2

# Binary and decimal units both appear on spec sheets (a "16 GB" card has 16 GiB).
_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MiB,
    "mb": 1000**2,
    "mib": MiB,
    "g": GiB,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_GPUS_RE: Final = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?(.+)$")
MAX_GPUS: Final = 64


class SizeError(ValueError):
    """A size or GPU spec that cannot be read; the message says what was expected."""


def parse_size(text: str | int, field: str = "size") -> int:
    """`16GiB` / `16GB` / `16G` / `1.5TiB` / `17179869184` -> bytes (> 0)."""
    if isinstance(text, bool):
        raise SizeError(f"{field}: expected a size like '16GiB', got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise SizeError(f"{field}: must be > 0 bytes, got {text}")
        return text
    if not isinstance(text, str):
        raise SizeError(f"{field}: expected a size like '16GiB', got {type(text).__name__}")
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise SizeError(
            f"{field}: cannot read {text!r}; expected a number with a unit like '16GiB', '16GB' or '16G'"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SizeError(f"{field}: must be > 0 bytes, got {text!r}")
    return value


def parse_gpus(text: str, field: str = "gpus") -> list[int]:
    """`2x16GiB` -> [16 GiB, 16 GiB]; `16GiB` is one card; `0` or `none` is no GPU."""
    if not isinstance(text, str):
        raise SizeError(f"{field}: expected a spec like '1x16GiB' or '2x16GiB', got {type(text).__name__}")
    if text.strip().lower() in ("0", "none", "cpu"):
        return []
    m = _GPUS_RE.match(text)
    if not m:
        raise SizeError(f"{field}: cannot read {text!r}; expected COUNTxSIZE like '2x16GiB'")
    count = int(m.group(1)) if m.group(1) else 1
    if not 1 <= count <= MAX_GPUS:
        raise SizeError(f"{field}: GPU count must be 1..{MAX_GPUS}, got {count}")
    size = parse_size(m.group(2), field)
    return [size] * count


def fmt_bytes(n: float) -> str:
    """Human figure in binary units, the way nvidia-smi and the allocator count."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"
