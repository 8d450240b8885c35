"""The shared MessagePack vectors, Python side.

The same file is checked by ExUnit (elixir_bridge/test/msgpack_test.exs), so
the two codecs agree byte for byte with the worker's framing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.protocol.framing import FrameError, decode_payload, encode_frame

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "msgpack_vectors.json"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_msgpack_vectors", ROOT / "scripts" / "gen_msgpack_vectors.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_msgpack_vectors", module)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
DOC = json.loads(VECTORS.read_text(encoding="utf-8"))
DECODE = [v for v in DOC["vectors"] if v["kind"] == "decode"]
ERRORS = [v for v in DOC["vectors"] if v["kind"] == "error"]


def untag(node: dict[str, Any]) -> Any:
    """Rebuild the Python value a tagged node stands for (NaN compares by tag)."""
    t = node["t"]
    if t == "nil":
        return None
    if t == "bool":
        return node["v"]
    if t == "int":
        return int(node["v"])
    if t == "float":
        return struct.unpack(">d", bytes.fromhex(node["v"]))[0]
    if t == "nan":
        return math.nan
    if t in ("inf", "-inf"):
        return math.inf if t == "inf" else -math.inf
    if t == "str":
        return bytes.fromhex(node["v"]).decode("utf-8")
    if t == "bin":
        return bytes.fromhex(node["v"])
    if t == "array":
        return [untag(v) for v in node["v"]]
    if t == "map":
        return {untag(k): untag(v) for k, v in node["v"]}
    raise AssertionError(f"unknown tag {t!r}")


def test_vector_file_is_up_to_date() -> None:
    assert GEN.main(["--check", "--out", str(VECTORS)]) == 0


def test_vector_file_covers_every_kind() -> None:
    tags: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        tags.add(node["t"])
        if node["t"] == "array":
            for v in node["v"]:
                walk(v)
        elif node["t"] == "map":
            for k, v in node["v"]:
                walk(k)
                walk(v)

    for vec in DECODE:
        walk(vec["value"])
    assert tags == {"nil", "bool", "int", "float", "nan", "inf", "-inf", "str", "bin", "array", "map"}
    assert len(ERRORS) >= 10


@pytest.mark.parametrize("vec", DECODE, ids=[v["name"] for v in DECODE])
def test_decode_vectors(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    got = msgpack.unpackb(data, raw=False, strict_map_key=False)
    assert GEN.tag(got) == vec["value"]
    if vec["encode"]:
        assert msgpack.packb(untag(vec["value"]), use_bin_type=True) == data
    if isinstance(got, dict) and all(isinstance(k, str) for k in got):
        # The worker's own framing reads it too.
        assert GEN.tag(decode_payload(data)) == vec["value"]


@pytest.mark.parametrize("vec", ERRORS, ids=[v["name"] for v in ERRORS])
def test_error_vectors_are_refused(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    with pytest.raises(FrameError):
        decode_payload(data)
    try:
        got = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return
    # msgpack itself accepts ext types; the protocol has no use for them.
    assert isinstance(got, (msgpack.ExtType, msgpack.Timestamp)), got


leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
trees = st.recursive(
    leaves,
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=6),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(trees)
def test_tagged_form_round_trips(value: Any) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    tagged = GEN.tag(msgpack.unpackb(packed, raw=False, strict_map_key=False))
    assert GEN.tag(untag(json.loads(json.dumps(tagged)))) == tagged


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), trees, max_size=6))
def test_frames_never_carry_non_finite_floats(value: dict[str, Any]) -> None:
    frame = encode_frame(value)
    decoded = decode_payload(frame[4:])

    def finite(node: Any) -> bool:
        if isinstance(node, float):
            return math.isfinite(node)
        if isinstance(node, list):
            return all(finite(v) for v in node)
        if isinstance(node, dict):
            return all(finite(v) for v in node.values())
        return True

    assert finite(decoded)
