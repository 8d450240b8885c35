"""Checkpoints written by an earlier release still resume: a config key added later must not
change the resume hash of a config that does not use it (a changed hash refuses every old
checkpoint with checkpoint_mismatch, and with an empty list of differences).

`tests/data/resume_compat/` holds preset files as the first release shipped them and the
resume hashes that release computed for them; new releases must compute the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uff_port.core.config import load_config, resume_hash

DATA = Path(__file__).parent / "data" / "resume_compat"
HASHES = json.loads((DATA / "hashes.json").read_text())


@pytest.mark.parametrize("name", sorted(HASHES))
def test_an_earlier_releases_checkpoints_still_resume(name: str) -> None:
    assert resume_hash(load_config(DATA / f"{name}.yaml")) == HASHES[name]


def test_a_new_key_binds_once_it_is_set() -> None:
    cfg = load_config(DATA / "tiny.yaml", {"model.init_adapter": "/parent/final"})
    assert resume_hash(cfg) != HASHES["tiny"]


def test_deterministic_kernels_do_not_bind_a_checkpoint() -> None:
    """`training.deterministic` chooses kernels, not what is learned: a run may turn it on at a resume."""
    cfg = load_config(DATA / "tiny.yaml", {"training.deterministic": True})
    assert cfg.training.deterministic is True
    assert resume_hash(cfg) == HASHES["tiny"]
