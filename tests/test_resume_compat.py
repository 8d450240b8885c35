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


def test_a_resume_with_more_steps_runs_on_the_new_schedule() -> None:
    """The optimizer state holds the saved schedule's rate (0 at a cosine's end); the first
    resumed step must use the new schedule's, and an unchanged config its very bits."""
    torch = pytest.importorskip("torch")
    from uff_port.training.engines import lr_lambda, reschedule

    def restored(saved_steps: int, resumed_steps: int) -> tuple[float, float]:
        old = load_config(DATA / "tiny.yaml", {"training.max_steps": saved_steps, "training.lr_scheduler": "cosine"})
        new = load_config(DATA / "tiny.yaml", {"training.max_steps": resumed_steps, "training.lr_scheduler": "cosine"})
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(old))
        for _ in range(saved_steps):
            opt.step()
            sched.step()
        saved_lr = opt.param_groups[0]["lr"]
        opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda(new))
        opt2.load_state_dict(opt.state_dict())
        sched2.load_state_dict(sched.state_dict())
        reschedule(sched2)
        assert sched2.get_last_lr() == [opt2.param_groups[0]["lr"]]
        return saved_lr, opt2.param_groups[0]["lr"]

    saved, resumed = restored(20, 40)
    assert saved == pytest.approx(0.0, abs=1e-12) and resumed > 0.04  # half-way down the new cosine
    saved, resumed = restored(20, 20)
    assert resumed == saved  # bit for bit: the exact resume is untouched
