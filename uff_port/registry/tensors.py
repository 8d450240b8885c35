"""Find NaN/Inf in an artifact's safetensors weights, without torch.

A run that diverged can still write a well-formed adapter; its manifest hashes
match and every metadata gate passes. Only the numbers tell. A float is NaN or
Inf exactly when its exponent bits are all ones, so each tensor is checked as
unsigned integers through a read-only memory map: any float width (bf16
included, which numpy cannot represent), no copy, no torch.

The safetensors header is read with bounds (a hostile file cannot make us
allocate or seek past its end).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

MAX_HEADER_BYTES: Final = 100 * 2**20  # the format's own limit
# dtype -> (unsigned view, exponent mask). F8_E4M3 has no Inf; its NaN is S.1111.111.
_FLOATS: Final[dict[str, tuple[str, int]]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000),
    "F32": ("<u4", 0x7F80_0000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
}


class TensorFileError(ValueError):
    """Not a readable safetensors file (bad header, offsets past the end)."""


@dataclass
class FiniteReport:
    files: int = 0
    tensors: int = 0
    nonfinite: list[str] = field(default_factory=list)
    """'file:tensor (n of m values)' for every tensor holding NaN or Inf."""

    @property
    def ok(self) -> bool:
        return not self.nonfinite


def _header(path: Path, size: int) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise TensorFileError(f"{path.name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise TensorFileError(f"{path.name}: header length {n} is out of bounds")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise TensorFileError(f"{path.name}: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path.name}: header is not a JSON object")
    return header, 8 + n


def scan_file(path: Path, report: FiniteReport) -> None:
    import numpy as np  # with the train extra; imported here so the registry stays light

    size = path.stat().st_size
    header, start = _header(path, size)
    report.files += 1
    data = np.memmap(path, dtype="u1", mode="r") if size > start else None
    for name, info in sorted(header.items()):
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        report.tensors += 1
        kind = _FLOATS.get(str(info.get("dtype")))
        offsets = info.get("data_offsets")
        if kind is None:  # integer or bool tensors are always finite
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise TensorFileError(f"{path.name}: tensor {name!r} has no valid data_offsets")
        lo, hi = start + offsets[0], start + offsets[1]
        width = np.dtype(kind[0]).itemsize
        if not (start <= lo <= hi <= size) or (hi - lo) % width:
            raise TensorFileError(f"{path.name}: tensor {name!r} lies outside the file")
        if data is None or hi == lo:
            continue
        bits = data[lo:hi].view(kind[0])
        bad = int(np.count_nonzero((bits & kind[1]) == kind[1]))
        if bad:
            report.nonfinite.append(f"{path.name}:{name} ({bad} of {bits.size} values)")


def scan_tree(root: Path) -> FiniteReport:
    """Every `*.safetensors` under `root` (the adapter, a merged model); symlinks are not followed."""
    report = FiniteReport()
    for path in sorted(root.rglob("*.safetensors")):
        if path.is_symlink() or not path.is_file():
            continue
        scan_file(path, report)
    return report
