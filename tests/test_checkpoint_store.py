"""Commit protocol, verification, quarantine and crash recovery of CheckpointStore (no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uff_port.core.checkpoint_store import (
    CHECKPOINT_FORMAT,
    KILL_AT_ENV,
    LATEST,
    WORKER_PID_ENV,
    CheckpointMismatch,
    CheckpointStore,
    CheckpointUnloadable,
    parse_step,
    step_name,
)
from uff_port.core.config import resume_hash, resume_view, validate_config
from uff_port.fsutil import UnsafePath

CRASH_POINTS = ("begun", "writing", "files_synced", "manifest_written", "old_moved_aside", "renamed", "latest_written", "pruned")


class Crash(BaseException):
    """Stands in for SIGKILL at a commit sub-step (BaseException: nothing may swallow it)."""


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


def write_files(staging: Path, step: int, tag: str = "", partial: bool = False) -> None:
    (staging / "adapter_model.safetensors").write_bytes(f"weights {step} {tag}".encode() * 50)
    if partial:
        return
    (staging / "optimizer.pt").write_bytes(f"optim {step} {tag}".encode() * 100)
    (staging / "sub").mkdir()
    (staging / "sub" / "rng-rank0.pt").write_bytes(os.urandom(64))
    (staging / "trainer_state.json").write_text(json.dumps({"step": step, "tag": tag}))


def save(store: CheckpointStore, step: int, meta: dict[str, Any] | None = None, tag: str = "") -> Path:
    staging = store.begin(step)
    write_files(staging, step, tag)
    return store.commit(staging, step, meta or {"config_hash": "c"})


def test_commit_layout_manifest_latest_and_prune(tmp_path: Path) -> None:
    rec = Recorder()
    store = CheckpointStore(tmp_path, keep_last=2, emit=rec)
    for step in (10, 20, 30):
        final = save(store, step, {"config_hash": "abc", "tokens_seen": step * 7})
    assert final == tmp_path / "checkpoints" / "step-00000030"
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step-00000030\n"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["format"] == CHECKPOINT_FORMAT and manifest["step"] == 30
    assert manifest["config_hash"] == "abc" and manifest["tokens_seen"] == 210
    assert set(manifest["files"]) == {"adapter_model.safetensors", "optimizer.pt", "sub/rng-rank0.pt", "trainer_state.json"}
    assert [p.step for p in store.list_committed()] == [20, 30]  # 10 pruned after 30 committed
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    point = CheckpointStore(tmp_path).find_resume_point()
    assert point is not None and point.step == 30 and point.manifest["tokens_seen"] == 210
    assert rec.named("checkpoint_quarantined") == []


def test_recommit_same_step_replaces_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save(store, 5, tag="first")
    save(store, 5, tag="second")
    point = store.find_resume_point()
    assert point is not None and point.step == 5
    assert json.loads((point.path / "trainer_state.json").read_text())["tag"] == "second"
    assert len(store.list_committed()) == 1


def test_meta_cannot_override_manifest_fields(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    staging = store.begin(1)
    write_files(staging, 1)
    with pytest.raises(ValueError, match="reserved"):
        store.commit(staging, 1, {"files": {}})


def test_step_names() -> None:
    assert step_name(100) == "step-00000100"
    assert parse_step("step-00000100") == 100
    assert parse_step("step-123456789") == 123456789
    assert parse_step(".staging-step-00000100-1-0") is None
    with pytest.raises(ValueError):
        step_name(-1)


# -- corruption: each case falls back (or starts fresh) with an event -------------------


def two_checkpoints(tmp_path: Path) -> tuple[CheckpointStore, Recorder]:
    store = CheckpointStore(tmp_path)
    save(store, 10)
    save(store, 20)
    rec = Recorder()
    return CheckpointStore(tmp_path, emit=rec), rec


def flip_byte(path: Path, offset: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: flip_byte(d / "optimizer.pt"), "sha256 mismatch: optimizer.pt"),
        (lambda d: os.truncate(d / "adapter_model.safetensors", 10), "wrong size"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "sub" / "rng-rank0.pt").unlink(), "missing: sub/rng-rank0.pt"),
        (lambda d: (d / "stray.bin").write_bytes(b"x"), "unexpected: stray.bin"),
    ],
    ids=["flip-byte", "truncate", "no-manifest", "bad-manifest", "missing-file", "extra-file"],
)
def test_damaged_latest_is_quarantined_and_previous_used(tmp_path: Path, damage: Any, reason: str) -> None:
    store, rec = two_checkpoints(tmp_path)
    damage(tmp_path / "checkpoints" / "step-00000020")
    point = store.find_resume_point()
    assert point is not None and point.step == 10
    (event,) = rec.named("checkpoint_quarantined")
    assert reason in event["reason"] and event["name"] == "step-00000020"
    quarantined = Path(event["path"])
    assert quarantined.parent == tmp_path / "checkpoints" / "quarantine" and quarantined.is_dir()
    assert not (tmp_path / "checkpoints" / "step-00000020").exists()
    # LATEST now names what we resume, so the next reader goes straight there.
    assert store.latest_name() == "step-00000010"


def test_deleted_latest_uses_newest_without_quarantine(tmp_path: Path) -> None:
    store, rec = two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / LATEST).unlink()
    point = store.find_resume_point()
    assert point is not None and point.step == 20
    assert rec.named("checkpoint_quarantined") == []
    assert store.latest_name() == "step-00000020"


def test_dangling_latest_is_quarantined(tmp_path: Path) -> None:
    store, rec = two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / LATEST).write_text("step-00000099\n")
    point = store.find_resume_point()
    assert point is not None and point.step == 20
    (event,) = rec.named("checkpoint_quarantined")
    assert event["name"] == LATEST and "step-00000099" in event["reason"]
    assert (Path(event["path"]) / LATEST).read_text() == "step-00000099\n"


def test_all_damaged_starts_fresh_and_says_so(tmp_path: Path) -> None:
    store, rec = two_checkpoints(tmp_path)
    for name in ("step-00000010", "step-00000020"):
        flip_byte(tmp_path / "checkpoints" / name / "adapter_model.safetensors")
    assert store.find_resume_point() is None
    assert len(rec.named("checkpoint_quarantined")) == 2
    (log,) = rec.named("log")
    assert "starting fresh" in log["message"] and log["level"] == "info"


def test_empty_run_dir_starts_fresh(tmp_path: Path) -> None:
    rec = Recorder()
    assert CheckpointStore(tmp_path / "nothing", emit=rec).find_resume_point() is None
    assert "starting fresh" in rec.named("log")[0]["message"]


def test_leftover_staging_is_cleaned_and_ignored(tmp_path: Path) -> None:
    store, rec = two_checkpoints(tmp_path)
    staging = store.begin(30)
    write_files(staging, 30, partial=True)
    fresh = CheckpointStore(tmp_path, emit=rec)
    point = fresh.find_resume_point()
    assert point is not None and point.step == 20  # a staging dir is never a candidate
    assert fresh.cleanup_staging() == [staging.name]
    assert not staging.exists()
    assert "leftover" in rec.named("log")[0]["message"]


# -- config / tokenizer mismatch ------------------------------------------------------------


def expect_for(cfg_raw: dict[str, Any], tokenizer_hash: str = "tok1") -> dict[str, Any]:
    cfg = validate_config(cfg_raw)
    return {"resume_hash": resume_hash(cfg), "resume_view": resume_view(cfg), "tokenizer_hash": tokenizer_hash}


def test_mismatched_config_is_refused_by_dotted_path(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save(store, 10, expect_for({"training": {"learning_rate": 1e-4}}))
    with pytest.raises(CheckpointMismatch) as info:
        store.find_resume_point(expect_for({"training": {"learning_rate": 3e-4}, "lora": {"r": 4}}))
    diffs = info.value.differences
    assert any(d.startswith("training.learning_rate: 0.0001 -> 0.0003") for d in diffs)
    assert any(d.startswith("lora.r: 16 -> 4") for d in diffs)
    assert "training.learning_rate" in str(info.value)
    assert (tmp_path / "checkpoints" / "step-00000010").is_dir()  # not quarantined


def test_resume_neutral_changes_are_accepted(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save(store, 10, expect_for({}))
    point = store.find_resume_point(expect_for({"training": {"max_steps": 999}, "checkpoint": {"keep_last": 9}}))
    assert point is not None and point.step == 10


def test_mismatched_tokenizer_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save(store, 10, expect_for({}, "tok1"))
    with pytest.raises(CheckpointMismatch, match="tokenizer_hash: 'tok1' -> 'tok2'"):
        store.find_resume_point(expect_for({}, "tok2"))


# -- crashes at every commit sub-step -------------------------------------------------------


def commit_with_crash(store: CheckpointStore, step: int, point: str | None, hits: list[str]) -> None:
    def hook(name: str) -> None:
        hits.append(name)
        if name == point:
            raise Crash(name)

    store._fault = hook
    staging = store.begin(step)
    write_files(staging, step, partial=point == "writing")
    if point == "writing":
        raise Crash("writing")
    store.commit(staging, step, {"config_hash": "c"})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keep_last=st.integers(1, 3),
    plan=st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from((None,) + CRASH_POINTS)), min_size=1, max_size=10
    ),
)
def test_any_crash_point_resumes_from_last_committed(tmp_path_factory: Any, keep_last: int, plan: Any) -> None:
    run = tmp_path_factory.mktemp("run")
    rec = Recorder()
    store = CheckpointStore(run, keep_last=keep_last, emit=rec)
    position, committed = 0, 0  # the run's step, and the step LATEST durably names
    for advance, crash in plan:
        step = position + advance
        hits: list[str] = []
        try:
            commit_with_crash(store, step, crash, hits)
            committed = position = step
            continue
        except Crash as exc:
            if "latest_written" in hits:  # crashed after LATEST moved: that save counts
                committed = step
            elif "renamed" in hits and committed == 0:
                # durable and verified but not yet named by LATEST; with no LATEST
                # at all, the newest verified checkpoint is the one to resume.
                committed = step
            assert str(exc) in hits or str(exc) == "writing"
        # "restart": a new process opens the run directory and resumes
        store = CheckpointStore(run, keep_last=keep_last, emit=rec)
        store.cleanup_staging()
        point = store.find_resume_point()
        assert (point.step if point else 0) == committed
        position = committed
    assert rec.named("checkpoint_quarantined") == []
    point = CheckpointStore(run).find_resume_point()
    assert (point.step if point else 0) == committed


_KILL_CHILD = r"""
import sys
from uff_port.core.checkpoint_store import CheckpointStore
run, step = sys.argv[1], int(sys.argv[2])
store = CheckpointStore(run, keep_last=2)
store.find_resume_point()
staging = store.begin(step)
(staging / "w.bin").write_bytes(b"w" * 4096 * step)
store.commit(staging, step, {"config_hash": "c"})
"""


@pytest.mark.slow
def test_sigkill_mid_commit_in_a_real_process(tmp_path: Path) -> None:
    """The same recovery, with the writer really killed (KILL_AT_ENV) at each sub-step."""
    save(CheckpointStore(tmp_path), 1)
    last = 1
    points = ("begun", "files_synced", "manifest_written", "renamed", "latest_written", "pruned", "none")
    for step, point in enumerate(points, start=2):
        env = {**os.environ, KILL_AT_ENV: f"{step}:{point}" if point != "none" else ""}
        proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(tmp_path), str(step)], env=env, timeout=60)
        assert proc.returncode == (0 if point == "none" else -9)
        if point in ("latest_written", "pruned", "none"):
            last = step
        store = CheckpointStore(tmp_path, keep_last=2)
        store.cleanup_staging()
        found = store.find_resume_point()
        assert (found.step if found else 0) == last
    # the same-step replace, killed between its two renames: the old one comes back
    env = {**os.environ, KILL_AT_ENV: f"{last}:old_moved_aside"}
    proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(tmp_path), str(last)], env=env, timeout=60)
    assert proc.returncode == -9 and not (tmp_path / "checkpoints" / step_name(last)).exists()
    found = CheckpointStore(tmp_path).find_resume_point()
    assert found is not None and found.step == last


def test_kill_at_env_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KILL_AT_ENV, "12:nowhere")
    with pytest.raises(ValueError, match="STEP:POINT"):
        CheckpointStore(tmp_path)


# -- whatever is on disk, reading never crashes ------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    latest=st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"step-00000010\n", b"step-00000020", b"../x"])),
    manifest=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
def test_garbage_latest_and_manifest_never_crash(tmp_path_factory: Any, latest: bytes | None, manifest: bytes) -> None:
    run = tmp_path_factory.mktemp("garbage")
    store = CheckpointStore(run)
    save(store, 10)
    save(store, 20)
    (run / "checkpoints" / "step-00000020" / "manifest.json").write_bytes(manifest)
    if latest is None:
        (run / "checkpoints" / LATEST).unlink()
    else:
        (run / "checkpoints" / LATEST).write_bytes(latest)
    rec = Recorder()
    point = CheckpointStore(run, emit=rec).find_resume_point()
    assert point is not None and point.step in (10, 20)
    if point.step == 10 and (latest or b"").strip() != b"step-00000010":  # damaged one set aside
        assert any(e["name"] == "step-00000020" for e in rec.named("checkpoint_quarantined"))
    assert CheckpointStore(run).latest_name() == point.path.name
    assert (run / "checkpoints").resolve() in point.path.resolve().parents


_HOLD_LOCK = r"""
import sys, time
from uff_port.core.checkpoint_store import CheckpointStore
assert CheckpointStore(sys.argv[1]).acquire_writer()
print("held", flush=True)
time.sleep(60)
"""


def test_writer_lock_waits_for_a_predecessor_to_die(tmp_path: Path) -> None:
    store, _ = two_checkpoints(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert not store.acquire_writer(timeout=0.2)
        assert store.writer_pid() == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert store.acquire_writer(timeout=5)  # SIGKILL released the flock
    assert store.writer_pid() == os.getpid()
    assert store.acquire_writer() is True  # re-entrant for its holder
    store.release_writer()
    other = CheckpointStore(tmp_path)
    assert other.acquire_writer() and not CheckpointStore(tmp_path).acquire_writer()
    other.release_writer()


def test_store_never_imports_torch() -> None:
    """The worker answers `train`/`resume` with it in milliseconds: no torch, ever."""
    code = (
        "import sys, tempfile\n"
        "from uff_port.core.checkpoint_store import CheckpointStore\n"
        "s = CheckpointStore(tempfile.mkdtemp())\n"
        "d = s.begin(1); (d / 'w').write_bytes(b'w'); s.commit(d, 1, {'resume_hash': 'x', 'resume_view': {}})\n"
        "try:\n"
        "    s.find_resume_point({'resume_hash': 'z', 'resume_view': {'a': 1}})\n"
        "except Exception as exc:\n"
        "    assert 'a: None -> 1' in str(exc), exc\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- one recovery path: a loader, a trusted choice, symlinks, the handed-over lock ---------------


def test_a_checkpoint_that_does_not_load_is_quarantined_and_the_next_loaded(tmp_path: Path) -> None:
    store, rec = two_checkpoints(tmp_path)
    loaded: list[str] = []

    def load(path: Path) -> str:
        loaded.append(path.name)
        if path.name == "step-00000020":
            raise CheckpointUnloadable("UnpicklingError: refused")
        return f"state of {path.name}"

    point = store.find_resume_point(load=load)
    assert point is not None and point.step == 10 and point.state == "state of step-00000010"
    assert loaded == ["step-00000020", "step-00000010"]
    (event,) = rec.named("checkpoint_quarantined")
    assert event["name"] == "step-00000020" and event["reason"] == "does not load: UnpicklingError: refused"
    assert store.latest_name() == "step-00000010"


def test_a_trusted_choice_is_not_rehashed_while_it_is_still_the_newest(tmp_path: Path) -> None:
    store, rec = two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000020"
    flip_byte(newest / "optimizer.pt")  # damage only a re-hash would see
    point = store.find_resume_point(trusted=newest)
    assert point is not None and point.step == 20 and rec.named("checkpoint_quarantined") == []
    # A newer checkpoint appeared (the lock was let go in between): everything is re-checked.
    save(CheckpointStore(tmp_path, keep_last=5), 30)
    flip_byte(tmp_path / "checkpoints" / "step-00000030" / "optimizer.pt")
    point = store.find_resume_point(trusted=newest)
    assert point is not None and point.step == 10
    assert [e["name"] for e in rec.named("checkpoint_quarantined")] == ["step-00000030", "step-00000020"]


def test_symlinked_step_dirs_latest_and_files_are_quarantined_never_followed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store, rec = two_checkpoints(run)
    outside = tmp_path / "outside"
    shutil.copytree(run / "checkpoints" / "step-00000020", outside / "step-00000020")
    ckpts = run / "checkpoints"
    (ckpts / "step-00000090").symlink_to(outside / "step-00000020", target_is_directory=True)
    (ckpts / "step-00000020" / "extra.bin").symlink_to(outside / "step-00000020" / "optimizer.pt")
    (ckpts / LATEST).unlink()
    (ckpts / LATEST).symlink_to(outside / "LATEST")
    (outside / "LATEST").write_text("step-00000090\n")
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    point = store.find_resume_point()
    assert point is not None and point.step == 10
    reasons = {e["name"]: e["reason"] for e in rec.named("checkpoint_quarantined")}
    assert "symlink" in reasons[LATEST] and "is a symlink" in reasons["step-00000090"]
    assert "holds symlinks" in reasons["step-00000020"] and "extra.bin" in reasons["step-00000020"]
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert not (outside / "quarantine").exists()


def test_a_symlinked_checkpoints_dir_is_refused_for_reading_and_writing(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    save(CheckpointStore(outside), 10)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(outside / "checkpoints", target_is_directory=True)
    store = CheckpointStore(run)
    for attempt in (store.find_resume_point, lambda: store.begin(20), store.cleanup_staging, store.list_committed):
        with pytest.raises(UnsafePath, match="leads outside"):
            attempt()
    assert sorted(p.name for p in (outside / "checkpoints").iterdir()) == [LATEST, "step-00000010"]


def test_the_lock_is_handed_over_with_its_descriptor_never_free_in_between(tmp_path: Path) -> None:
    worker = CheckpointStore(tmp_path)
    assert worker.acquire_writer()
    fd = os.dup(worker.lock_fd or -1)  # what the trainer inherits
    worker.release_writer()
    assert not CheckpointStore(tmp_path).acquire_writer(), "the lock was free after the worker let go"
    trainer = CheckpointStore(tmp_path)
    assert trainer.adopt_writer(fd) and trainer.writer_pid() == os.getpid()
    trainer.release_writer()
    assert CheckpointStore(tmp_path).acquire_writer()
    stray = os.open(tmp_path / "stray", os.O_RDWR | os.O_CREAT)
    assert not CheckpointStore(tmp_path).adopt_writer(stray)  # not our lock file: not adopted
    os.close(stray)


def test_the_holder_is_named_only_if_it_holds_the_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = two_checkpoints(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE,
        env={**os.environ, WORKER_PID_ENV: "999999999"},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        found = store.writer_holder()
        assert found is not None and found.pid == holder.pid and found.worker_pid == 999999999
        assert found.orphaned  # its recorded worker does not exist
    finally:
        holder.kill()
        holder.wait()
    # A pid written into the lock file by hand is never trusted: it must hold the file open.
    (tmp_path / "checkpoints.lock").write_text(f"{os.getppid()}\nworker 999999999\n")
    assert store.writer_holder() is None
