"""fsutil.open_confined / confine_existing: the two checks every file of a run goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uff_port.fsutil import UnsafePath, confine_existing, find_symlinks, open_confined


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "run" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("TOPSECRET\n")
    return tmp_path / "run"


def test_a_plain_file_opens_for_append_and_read(root: Path) -> None:
    with open_confined(root, root / "events.jsonl", "a") as fh:
        fh.write("one\n")
    with open_confined(root, root / "events.jsonl", "rb") as fh:
        assert fh.read() == b"one\n"


@pytest.mark.parametrize("mode", ["a", "rb", "rb+"])
def test_a_symlink_as_the_last_component_is_refused(root: Path, mode: str) -> None:
    (root / "events.jsonl").symlink_to(root.parent / "outside" / "secret")
    with pytest.raises(UnsafePath, match="is a symlink"):
        open_confined(root, root / "events.jsonl", mode)
    assert (root.parent / "outside" / "secret").read_text() == "TOPSECRET\n"


def test_a_symlinked_directory_on_the_way_is_refused(root: Path) -> None:
    (root / "checkpoints").symlink_to(root.parent / "outside", target_is_directory=True)
    with pytest.raises(UnsafePath, match="lies outside"):
        open_confined(root, root / "checkpoints" / "secret", "rb")
    with pytest.raises(UnsafePath, match="leads outside"):
        confine_existing(root, root / "checkpoints")
    assert confine_existing(root, root / "sub") == (root / "sub").resolve()
    assert confine_existing(root, root / "not-yet") == root / "not-yet"


def test_a_fifo_is_refused_without_hanging(root: Path) -> None:
    os.mkfifo(root / "trainer.log")
    for mode in ("ab", "rb"):  # a blocking open would wait for a peer forever
        with pytest.raises(UnsafePath, match="not a regular file"):
            open_confined(root, root / "trainer.log", mode)


def test_find_symlinks_lists_files_and_directories(root: Path) -> None:
    (root / "sub" / "a").symlink_to(root.parent / "outside" / "secret")
    (root / "d").symlink_to(root.parent / "outside", target_is_directory=True)
    (root / "plain").write_text("x")
    assert find_symlinks(root) == ["d", "sub/a"]
