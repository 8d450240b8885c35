"""Framing and message parsing: round trips, limits, every malformed shape."""

from __future__ import annotations

import math
import os
import struct
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.protocol import (
    CommandError,
    FrameError,
    FrameReader,
    decode_payload,
    encode_frame,
    sanitize,
)
from uff_port.protocol.messages import Arg, check_args, parse_request

wire_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50),
    st.binary(max_size=50),
)
wire_values = st.recursive(
    wire_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30,
)


def _pipe_with(data: bytes) -> int:
    r, w = os.pipe()

    def feed() -> None:
        os.write(w, data) if len(data) < 60000 else [os.write(w, data[i : i + 4096]) for i in range(0, len(data), 4096)]
        os.close(w)

    threading.Thread(target=feed, daemon=True).start()
    return r


@given(st.dictionaries(st.text(max_size=20), wire_values, max_size=8))
@settings(max_examples=300, deadline=None)
def test_round_trip_any_map(obj: dict) -> None:
    frame = encode_frame(obj)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert decode_payload(frame[4:]) == obj


def test_strings_are_str_and_bytes_are_bin() -> None:
    payload = encode_frame({"s": "é", "b": b"\x00\xff"})[4:]
    # 0xa? / 0xd9 = str family, 0xc4 = bin 8
    assert b"\xa2\xc3\xa9" in payload
    assert b"\xc4\x02\x00\xff" in payload


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_non_finite_floats_become_nil(x: float) -> None:
    out = decode_payload(encode_frame({"x": x, "nested": [x, {"y": x}]})[4:])
    if math.isfinite(x):
        assert out["x"] == x
    else:
        assert out == {"x": None, "nested": [None, {"y": None}]}


def test_sanitize_tuples_to_lists() -> None:
    assert sanitize({"a": (1, float("nan"))}) == {"a": [1, None]}


def test_reader_reads_consecutive_frames_then_eof() -> None:
    data = b"".join(encode_frame({"i": i}) for i in range(100))
    reader = FrameReader(_pipe_with(data))
    got = []
    while (payload := reader.read()) is not None:
        got.append(decode_payload(payload)["i"])
    assert got == list(range(100))


def test_oversized_frame_refused_and_stream_stays_in_sync() -> None:
    big = struct.pack(">I", 200_000) + b"\x00" * 200_000
    data = encode_frame({"a": 1}) + big + encode_frame({"b": 2})
    reader = FrameReader(_pipe_with(data), max_frame_bytes=1000)
    assert decode_payload(reader.read()) == {"a": 1}  # type: ignore[arg-type]
    with pytest.raises(FrameError) as exc:
        reader.read()
    assert exc.value.code == "frame_too_large" and not exc.value.fatal
    assert "200000" in exc.value.message
    assert decode_payload(reader.read()) == {"b": 2}  # type: ignore[arg-type]


def test_oversized_header_is_never_allocated() -> None:
    # A header announcing 4 GiB followed by EOF: refused without allocating, reported truncated.
    reader = FrameReader(_pipe_with(struct.pack(">I", 0xFFFFFFFF) + b"abc"), max_frame_bytes=1 << 20)
    with pytest.raises(FrameError) as exc:
        reader.read()
    assert exc.value.code == "truncated_frame" and exc.value.fatal


@pytest.mark.parametrize(
    ("data", "what"),
    [(b"\x00\x00", "header"), (struct.pack(">I", 10) + b"abc", "frame")],
)
def test_truncated_frames(data: bytes, what: str) -> None:
    reader = FrameReader(_pipe_with(data))
    with pytest.raises(FrameError) as exc:
        reader.read()
    assert exc.value.code == "truncated_frame"
    assert what in exc.value.message


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1", "malformed_frame"),  # never-used byte
        (msgpack.packb([1, 2]), "invalid_request"),
        (msgpack.packb(5), "invalid_request"),
        (msgpack.packb({1: 2}, strict_types=False), "malformed_frame"),
        (msgpack.packb({"a": 1}) + b"\x01", "malformed_frame"),  # trailing bytes
        (b"\xa3\xff\xfe\xfd", "malformed_frame"),  # invalid utf-8 str
    ],
)
def test_bad_payloads_have_stable_codes(payload: bytes, code: str) -> None:
    with pytest.raises(FrameError) as exc:
        decode_payload(payload)
    assert exc.value.code == code


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        ({"cmd": "ping"}, "no 'id'"),
        ({"id": "1", "cmd": "ping"}, "'id' must be an integer, got string"),
        ({"id": True, "cmd": "ping"}, "'id' must be an integer, got boolean"),
        ({"id": 1}, "no 'cmd'"),
        ({"id": 1, "cmd": 5}, "'cmd' must be a string"),
        ({"id": 1, "cmd": "ping", "args": [1]}, "'args' must be a map, got array"),
        ({"id": 1, "cmd": "ping", "extra": 1}, "unknown request field"),
    ],
)
def test_request_shape_errors_name_the_field(frame: dict, needle: str) -> None:
    with pytest.raises(CommandError) as exc:
        parse_request(frame)
    assert exc.value.code == "invalid_request"
    assert needle in exc.value.message


def test_args_checked_by_name_and_type() -> None:
    spec = {"run_dir": Arg((str,), required=True), "checkpoint": Arg((int, str)), "flag": Arg((bool,))}
    with pytest.raises(CommandError) as exc:
        check_args("resume", {"checkpoint": True, "flag": 1, "nope": 2}, spec)
    msg = exc.value.message
    assert exc.value.code == "invalid_args"
    assert "args.run_dir: required" in msg
    assert "args.checkpoint: expected integer or string, got boolean" in msg
    assert "args.flag: expected boolean, got integer" in msg
    assert "args.nope: unknown argument" in msg
    fields = {f["field"] for f in exc.value.details["fields"]}
    assert fields == {"args.run_dir", "args.checkpoint", "args.flag", "args.nope"}


def test_payloads_skips_an_oversized_frame_and_ends_on_a_truncated_one() -> None:
    r, w = os.pipe()
    good = encode_frame({"cmd": "ping"})
    data = good + struct.pack(">I", 100) + b"x" * 100 + good + struct.pack(">I", 50) + b"cut"
    os.write(w, data)
    os.close(w)
    errors: list[str] = []
    got = list(FrameReader(r, max_frame_bytes=64).payloads(lambda e: errors.append(e.code)))
    os.close(r)
    assert got == [good[4:], good[4:]]
    assert errors == ["frame_too_large", "truncated_frame"]
