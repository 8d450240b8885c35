"""Generate tests/vectors/msgpack_vectors.json, the codec vectors both suites check.

The bytes come from the Python `msgpack` library (the worker's codec), so the
Elixir codec (`UffPort.Msgpack`) is checked against what the worker really
sends, and pytest checks that the file still matches the library.

Every expected value is a small tagged tree that a few-line JSON reader can
rebuild exactly, with no float printing or unicode escaping in between:

    {"t": "nil"} | {"t": "bool", "v": true} | {"t": "int", "v": "-12"}
    {"t": "float", "v": "<16 hex digits of the IEEE-754 double>"}
    {"t": "nan"} | {"t": "inf"} | {"t": "-inf"}
    {"t": "str", "v": "<hex of the UTF-8 bytes>"} | {"t": "bin", "v": "<hex>"}
    {"t": "array", "v": [...]} | {"t": "map", "v": [[key, value], ...]}

Vector kinds:
- `decode`: `hex` decodes to `value`. With `"encode": true` the Elixir encoder
  must also produce exactly `hex` from `value` (minimal widths, float64).
- `error`: `hex` is malformed or unsupported; both decoders must refuse it.

Run: .venv/bin/python scripts/gen_msgpack_vectors.py [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, Final

import msgpack

OUT: Final = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "msgpack_vectors.json"


def tag(value: Any) -> dict[str, Any]:
    """Tagged form of a Python value as `msgpack.unpackb(raw=False)` returns it."""
    if value is None:
        return {"t": "nil"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": str(value)}
    if isinstance(value, float):
        if math.isnan(value):
            return {"t": "nan"}
        if math.isinf(value):
            return {"t": "inf" if value > 0 else "-inf"}
        return {"t": "float", "v": struct.pack(">d", value).hex()}
    if isinstance(value, str):
        return {"t": "str", "v": value.encode("utf-8").hex()}
    if isinstance(value, bytes):
        return {"t": "bin", "v": value.hex()}
    if isinstance(value, (list, tuple)):
        return {"t": "array", "v": [tag(v) for v in value]}
    if isinstance(value, dict):
        return {"t": "map", "v": [[tag(k), tag(v)] for k, v in value.items()]}
    raise TypeError(f"no tagged form for {type(value).__name__}")


def _sorted_map(n: int, prefix: str = "k") -> dict[str, int]:
    # Sorted, so Elixir (which iterates small maps in key order) encodes the same bytes.
    return {f"{prefix}{i:05d}": i for i in range(n)}


def encodable_values() -> list[tuple[str, Any]]:
    """Values that Python packs exactly as the Elixir encoder must (minimal widths)."""
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
            -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
    floats = [0.0, -0.0, 1.5, -2.25, 3.141592653589793, 1e-300, 1.7976931348623157e308,
              5e-324, 0.1]
    strs = ["", "a", "hello", "x" * 31, "x" * 32, "y" * 255, "z" * 256, "w" * 65536,
            "héllo wörld", "日本語テキスト", "emoji \U0001f600", "nul\x00inside"]
    bins = [b"", b"\x00\xff", bytes(range(256)), b"\xab" * 65536]
    out: list[tuple[str, Any]] = [("nil", None), ("true", True), ("false", False)]
    out += [(f"int {i}", i) for i in ints]
    out += [(f"float {f!r}", f) for f in floats]
    out += [(f"str {len(s.encode())} bytes {s[:12]!r}", s) for s in strs]
    out += [(f"bin len {len(b)}", b) for b in bins]
    out += [
        ("array empty", []),
        ("array fix 15", list(range(15))),
        ("array16", list(range(16))),
        ("array mixed nested", [1, "two", [3.5, [None, True]], {"k": b"\x01"}]),
        ("map empty", {}),
        ("map fix 15", _sorted_map(15)),
        ("map16", _sorted_map(16)),
        ("map 32 keys", _sorted_map(32)),
        ("map int keys", {1: "a", 2: "b"}),
        ("request frame", {"args": {"config_path": "tiny", "overrides": {"training.max_steps": 40}},
                           "cmd": "train", "id": 7}),
        ("reply frame", {"id": 7, "ok": True, "result": {"job_id": "j1", "resumed_from": None,
                                                         "run_dir": "/runs/j1"}}),
        ("error reply", {"error": {"code": "busy", "details": None, "message": "a job is running"},
                         "id": 3, "ok": False}),
    ]
    return out


def decode_only() -> list[tuple[str, bytes]]:
    """Byte strings the encoder never produces but the decoder must read."""
    f32 = lambda x: b"\xca" + struct.pack(">f", x)  # noqa: E731
    big_map = msgpack.packb(_sorted_map(40, "m"), use_bin_type=True)  # >32 keys: order not checked
    return [
        ("float32 1.5", f32(1.5)),
        ("float32 0.1", f32(0.1)),
        ("float32 -0.0", f32(-0.0)),
        ("float32 NaN", b"\xca\x7f\xc0\x00\x00"),
        ("float32 +Inf", b"\xca\x7f\x80\x00\x00"),
        ("float32 -Inf", b"\xca\xff\x80\x00\x00"),
        ("float64 NaN", msgpack.packb(float("nan"))),
        ("float64 NaN negative payload", b"\xcb\xff\xf8\x00\x00\x00\x00\x00\x01"),
        ("float64 +Inf", msgpack.packb(float("inf"))),
        ("float64 -Inf", msgpack.packb(float("-inf"))),
        ("uint8 holding 1", b"\xcc\x01"),
        ("uint16 holding 1", b"\xcd\x00\x01"),
        ("uint32 holding 1", b"\xce\x00\x00\x00\x01"),
        ("uint64 holding 1", b"\xcf" + (1).to_bytes(8, "big")),
        ("int8 holding 5", b"\xd0\x05"),
        ("int16 holding -1", b"\xd1\xff\xff"),
        ("int32 holding 7", b"\xd2\x00\x00\x00\x07"),
        ("int64 holding -2", b"\xd3" + (-2).to_bytes(8, "big", signed=True)),
        ("str8 short", b"\xd9\x03abc"),
        ("str16 short", b"\xda\x00\x03abc"),
        ("str32 short", b"\xdb\x00\x00\x00\x03abc"),
        ("bin16", b"\xc5\x00\x02\x01\x02"),
        ("bin32", b"\xc6\x00\x00\x00\x02\x01\x02"),
        ("array32 small", b"\xdd\x00\x00\x00\x02\x01\x02"),
        ("map32 small", b"\xdf\x00\x00\x00\x01\xa1a\x01"),
        ("map16 small", b"\xde\x00\x01\xa1a\xc0"),
        ("map 40 keys", big_map),
        ("heartbeat with NaN loss", msgpack.packb({"event": "heartbeat", "loss": float("nan"),
                                                   "seq": 4, "ts": 1700000000.25}, use_bin_type=True)),
    ]


def error_vectors() -> list[tuple[str, bytes]]:
    """Malformed or unsupported input: both sides must refuse, never crash."""
    return [
        ("empty input", b""),
        ("reserved 0xc1", b"\xc1"),
        ("truncated uint16", b"\xcd\x01"),
        ("truncated float64", b"\xcb\x00\x00"),
        ("truncated float32", b"\xca\x00"),
        ("truncated str8 body", b"\xd9\x05ab"),
        ("truncated fixstr body", b"\xa5ab"),
        ("array announces more than present", b"\x93\x01\x02"),
        ("array32 announces 4G elements", b"\xdd\xff\xff\xff\xff\x01"),
        ("map missing value", b"\x81\xa1a"),
        ("map32 announces 4G pairs", b"\xdf\xff\xff\xff\xff"),
        ("bin32 announces 4 GiB", b"\xc6\xff\xff\xff\xff\x00"),
        ("invalid utf-8 in str", b"\xa2\xc3\x28"),
        ("fixext1", b"\xd4\x01\x00"),
        ("ext8 timestamp", b"\xc7\x0c\xff" + bytes(12)),
        ("trailing bytes", b"\x01\x02"),
    ]


def build() -> dict[str, Any]:
    vectors: list[dict[str, Any]] = []
    for name, value in encodable_values():
        packed = msgpack.packb(value, use_bin_type=True)
        vectors.append({"name": name, "kind": "decode", "encode": True, "hex": packed.hex(),
                        "value": tag(msgpack.unpackb(packed, raw=False, strict_map_key=False))})
    for name, data in decode_only():
        vectors.append({"name": name, "kind": "decode", "encode": False, "hex": data.hex(),
                        "value": tag(msgpack.unpackb(data, raw=False, strict_map_key=False))})
    for name, data in error_vectors():
        vectors.append({"name": name, "kind": "error", "hex": data.hex()})
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "vector names must be unique (they name tests)"
    return {"generator": "scripts/gen_msgpack_vectors.py",
            "msgpack_version": ".".join(map(str, msgpack.version)), "vectors": vectors}


def render(doc: dict[str, Any]) -> str:
    # One vector per line keeps diffs readable; the version line is left out of the
    # comparison in --check so another msgpack release does not fail it by itself.
    lines = [json.dumps(v, sort_keys=True) for v in doc["vectors"]]
    head = f'{{"generator": {json.dumps(doc["generator"])}, "msgpack_version": {json.dumps(doc["msgpack_version"])}, '
    return head + '"vectors": [\n' + ",\n".join(lines) + "\n]}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    doc = build()
    if args.check:
        current = json.loads(args.out.read_text(encoding="utf-8"))
        if current["vectors"] != json.loads(render(doc))["vectors"]:
            print(f"{args.out} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(doc), encoding="utf-8")
    print(f"wrote {len(doc['vectors'])} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
