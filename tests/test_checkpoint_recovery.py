"""Recovery through the real worker: a bad newest checkpoint is quarantined and the same `train` goes on.

Each case damages a copy of one finished run (checkpoints at steps 2 and 4) for
real, sends the `train` a supervisor would send, and requires the
`checkpoint_quarantined` event on the wire, a resume from the previous good
step and a finished run: never `internal`, never a crash loop.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from uff_port.client import WorkerClient
from uff_port.hashing import sha256_file

pytestmark = pytest.mark.slow
SMALL = {
    "training.max_steps": 4,
    "checkpoint.every_steps": 2,
    "checkpoint.keep_last": 3,
    "eval.every_steps": None,
    "eval.max_batches": 1,
    "data.seq_len": 64,
}


def train(w: WorkerClient, max_steps: int) -> dict:
    return w.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": {**SMALL, "training.max_steps": max_steps}})


def wait_done(w: WorkerClient) -> dict:
    return w.wait_event(lambda e: e.get("event") in ("finished", "failed"), timeout=240)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with committed checkpoints at steps 2 and 4 (trained once per module)."""
    root = tmp_path_factory.mktemp("base") / "runs"
    root.mkdir()
    with WorkerClient(runs_root=root, heartbeat_interval=0.5) as w:
        train(w, 4)
        assert wait_done(w)["event"] == "finished"
        w.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=60)
    ckpts = root / "job" / "checkpoints"
    assert (ckpts / "LATEST").read_text().strip() == "step-00000004" and (ckpts / "step-00000002").is_dir()
    return root / "job"


def rehash(ckpt: Path, rel: str) -> None:
    """Make the manifest agree with a replaced file: the damage passes verification."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": sha256_file(ckpt / rel), "size": (ckpt / rel).stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


class Evil:
    marker = ""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def flip_byte(run: Path) -> None:
    path = run / "checkpoints" / "step-00000004" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete_manifest(run: Path) -> None:
    (run / "checkpoints" / "step-00000004" / "manifest.json").unlink()


def latest_to_missing_step(run: Path) -> None:
    (run / "checkpoints" / "LATEST").write_text("step-00000009\n")


def malicious_pickle(run: Path) -> None:
    ckpt = run / "checkpoints" / "step-00000004"
    Evil.marker = str(run.parent / "pwned")
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": Evil(), "param_groups": []}))
    rehash(ckpt, "optimizer.pt")


def wrong_shape(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = run / "checkpoints" / "step-00000004"
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first][:-1].contiguous()
    save_file(tensors, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    rehash(ckpt, "adapter_model.safetensors")


# (damage, quarantined name, reason fragment, step the worker announces, step actually resumed)
CASES: dict[str, tuple[Callable[[Path], None], str, str, int, int]] = {
    "flipped-byte": (flip_byte, "step-00000004", "sha256 mismatch: optimizer.pt", 2, 2),
    "no-manifest": (delete_manifest, "step-00000004", "no manifest.json", 2, 2),
    "latest-to-missing-step": (latest_to_missing_step, "LATEST", "step-00000009", 4, 4),
    # Hashes match: only loading finds these, in the trainer, which falls back by itself.
    "malicious-pickle": (malicious_pickle, "step-00000004", "does not load: UnpicklingError", 4, 2),
    "wrong-shape": (wrong_shape, "step-00000004", "does not load: adapter: wrong shapes", 4, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_newest_checkpoint_is_quarantined_and_the_same_train_resumes(
    case: str, base_run: Path, runs_root: Path, worker: WorkerClient
) -> None:
    damage, name, reason, announced, resumed = CASES[case]
    run = runs_root / "job"
    shutil.copytree(base_run, run)
    damage(run)
    started = train(worker, 6)
    assert started["resumed_from"] == announced
    quarantined = worker.wait_event("checkpoint_quarantined", timeout=120)
    assert quarantined["job_id"] == "job" and quarantined["name"] == name and reason in quarantined["reason"]
    assert Path(quarantined["path"]).parent == run / "checkpoints" / "quarantine"
    assert Path(quarantined["path"]).exists()  # moved aside, never deleted
    done = wait_done(worker)
    assert done["event"] == "finished" and done["step"] == 6, done
    training = worker.wait_event(lambda e: e.get("event") == "state" and e.get("phase") == "training")
    assert training["resumed_from"] == resumed
    idle = worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=60)
    assert idle["outcome"] == "finished"
    assert not (runs_root / "pwned").exists(), "the checkpoint ran code"
    assert len(worker.events_named("checkpoint_quarantined")) == 1
