"""The `failed` and `finished` event fields have one builder each."""

from __future__ import annotations

import pytest

from uff_port.protocol import ErrorCode, failed_fields, finished_fields


def test_failed_fields_always_carry_code_message_resumable() -> None:
    fields = failed_fields(ErrorCode.TRAINER_FAILED, "boom", resumable=1, step=4, exit_status=-9)  # type: ignore[arg-type]
    assert fields == {"code": "trainer_failed", "message": "boom", "resumable": True, "step": 4, "exit_status": -9}
    assert type(fields["code"]) is str  # a plain string on the wire, not the enum


def test_finished_fields_carry_step_and_what_the_sender_knows() -> None:
    assert finished_fields(step=7, final=None, source="cloud") == {"step": 7, "final": None, "source": "cloud"}


def test_an_undocumented_field_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown field"):
        failed_fields("x", "y", resumable=False, exitstatus=1)
    with pytest.raises(TypeError, match="unknown field"):
        finished_fields(step=1, adapter="/x")
