"""Directory replacement and checkpoint installs: a crash at any point leaves the old or the new."""

from __future__ import annotations

from pathlib import Path

import pytest

from uff_port.fsutil import recover_dir, replace_dir
from uff_port.training.checkpoint_store import CheckpointStore


def _tree(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "a.txt").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "b.txt").write_text(text * 2)
    return path


class Died(Exception):
    pass


def test_replace_dir_swaps_whole_directories(tmp_path: Path) -> None:
    dst = _tree(tmp_path / "final", "old")
    replace_dir(_tree(tmp_path / ".incoming", "new"), dst)
    assert (dst / "a.txt").read_text() == "new" and (dst / "sub" / "b.txt").read_text() == "newnew"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_crash_mid_swap_is_recovered_to_the_old_directory(tmp_path: Path) -> None:
    dst = _tree(tmp_path / "final", "old")

    def die() -> None:
        raise Died

    with pytest.raises(Died):
        replace_dir(_tree(tmp_path / ".incoming", "new"), dst, after_move_aside=die)
    assert not dst.exists()  # the window a reader would see without recovery
    assert recover_dir(dst) is True
    assert (dst / "a.txt").read_text() == "old"
    # A later recover finds nothing to do; a leftover aside copy beside a good dst is dropped.
    assert recover_dir(dst) is False
    _tree(tmp_path / ".old-final-1-0", "stale")
    assert recover_dir(dst) is False and not (tmp_path / ".old-final-1-0").exists()


def test_install_copies_a_verified_checkpoint_and_moves_latest(tmp_path: Path) -> None:
    src = CheckpointStore(tmp_path / "remote")
    staging = src.begin(7)
    (staging / "w.bin").write_bytes(b"x" * 100)
    committed = src.commit(staging, 7, {"note": "remote"})
    local = CheckpointStore(tmp_path / "local", keep_last=2)
    point = local.install(committed)
    assert point.step == 7 and local.latest_name() == "step-00000007"
    assert local.find_resume_point() is not None and local.latest() == point
    # A damaged source is refused before anything is copied.
    (committed / "w.bin").write_bytes(b"y" * 100)
    other = CheckpointStore(tmp_path / "other")
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        other.install(committed)
    assert other.latest() is None and not (tmp_path / "other").exists()
