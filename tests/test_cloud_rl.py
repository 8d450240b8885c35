"""The RL stage through the cloud paths: a tasks file and an SFT corpus travel with the
session, the GRPO run trains in the (fake) Kaggle kernel, and its artifact and rollout
events come home."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.cloud.backends.kaggle import KaggleBackend
from uff_port.cloud.bundle import build_bundle
from uff_port.cloud.fakes import FakeKaggleApi
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.runner import CloudRun
from uff_port.cloud.settings import validate_cloud
from uff_port.core.config import apply_overrides, load_config_file, validate_config
from uff_port.eval.suites import builtin_path


def _tasks(tmp_path: Path, n: int = 4) -> Path:
    """A user's own tasks file (the evaluator's suite format): a few of a shipped suite's."""
    path = tmp_path / "my-tasks.jsonl"
    path.write_text("".join(builtin_path("ufm").read_text().splitlines(keepends=True)[:n]))
    return path


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 4}) + "\n" for i in range(40)))
    return path


def rl_tiny(tmp_path: Path, **over: Any) -> dict[str, Any]:
    """configs/rl-tiny.yaml cut to 4 steps, its prompts and SFT share from files of this machine."""
    return apply_overrides(load_config_file("rl-tiny"), {
        "training.max_steps": 4, "training.progress_every_seconds": 0, "checkpoint.every_steps": 2,
        "output.plot": False, "rl.prompts_per_step": 2, "rl.num_generations": 4, "training.micro_batch_size": 8,
        "rl.prompts": str(_tasks(tmp_path)), "rl.sft_ratio": 0.25, "rl.sft_path": str(_corpus(tmp_path)),
        "data.seq_len": 64, **over})


def test_the_tasks_file_and_sft_corpus_travel_in_the_bundle(tmp_path: Path, wheel: Path) -> None:
    cfg = validate_config(rl_tiny(tmp_path)).to_dict()
    import yaml

    build_bundle(tmp_path / "b", cfg, run_id="r", session="s0", wheel=wheel)

    remote = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert remote["data"]["path"] == "builtin:sample-corpus"
    assert remote["rl"]["sft_path"] == "data/01-sft.jsonl" and remote["rl"]["prompts"] == "data/02-my-tasks.jsonl"
    assert (tmp_path / "b" / "data" / "02-my-tasks.jsonl").read_bytes() == (tmp_path / "my-tasks.jsonl").read_bytes()
    # A shipped suite's name travels as it is.
    build_bundle(tmp_path / "c", validate_config(rl_tiny(tmp_path, **{"rl.prompts": "ufm"})).to_dict(),
                 run_id="r", session="s0", wheel=wheel)
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["rl"]["prompts"] == "ufm"
    assert sorted(p.name for p in (tmp_path / "c" / "data").iterdir()) == ["01-sft.jsonl"]


def test_the_init_adapter_travels_in_the_bundle_and_every_session_names_it_alike(tmp_path: Path, wheel: Path) -> None:
    """model.init_adapter (the SFT stage's adapter, a parent's) is a directory of this machine only."""
    import shutil

    import yaml

    from uff_port.cloud.bundle import BundleError
    from uff_port.cloud.entry import _session_config
    from uff_port.cloud.environment import Platform

    parent = tmp_path / "registry" / "artifacts" / "abc"
    parent.mkdir(parents=True)
    (parent / "adapter_model.safetensors").write_bytes(b"lora weights " + tmp_path.name.encode())
    (parent / "adapter_config.json").write_text("{}")
    (parent / "tokenizer.json").write_text("{}")
    cfg = validate_config(rl_tiny(tmp_path, **{"model.init_adapter": str(parent)})).to_dict()
    build_bundle(tmp_path / "b", cfg, run_id="r", session="s0", wheel=wheel)

    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["model"]["init_adapter"] == "data/init-adapter"
    assert sorted(p.name for p in (tmp_path / "b" / "data" / "init-adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    # Two sessions, each with the bundle unpacked somewhere else (Kaggle): one path, as the checkpoints bind it.
    shutil.copytree(tmp_path / "b", tmp_path / "b2")
    seen = [_session_config(Platform("kaggle", tmp_path / b, tmp_path, tmp_path, None, {}), None, 0.0)[1]
            ["model"]["init_adapter"] for b in ("b", "b2")]
    assert seen[0] == seen[1] and not seen[0].startswith(str(tmp_path))
    assert (Path(seen[0]) / "adapter_model.safetensors").read_bytes() == (parent / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(seen[0])
    # No weights there: refused before anything is uploaded, naming the key.
    (parent / "adapter_model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.init_adapter"):
        build_bundle(tmp_path / "c", cfg, run_id="r", session="s0", wheel=wheel)


@pytest.mark.slow
def test_rl_run_through_the_kaggle_fake_brings_its_adapter_and_rollouts_home(tmp_path: Path, wheel: Path) -> None:
    """The corpus piece (content-addressed, uploaded once) carries the tasks file and the SFT corpus."""
    api = FakeKaggleApi(tmp_path / "fake")
    raw = rl_tiny(tmp_path)
    raw["strategy"] = "kaggle"
    raw["cloud"] = {"poll": {"interval_seconds": 0.2}, "safety_margin_seconds": 5, "kaggle": {"session_hours": 0.5}}
    cfg = validate_config(raw)
    settings = validate_cloud(cfg.cloud)
    run_dir = tmp_path / "runs" / "rl"
    run_dir.mkdir(parents=True)
    events: list[tuple[str, dict[str, Any]]] = []
    run = CloudRun(
        run_dir, cfg, settings, run_id="rl",
        backend_factory=lambda _n: KaggleBackend(api, settings.kaggle, "rl", run_dir / "cloud" / "work", sleep=lambda s: None),
        ledger=QuotaLedger(tmp_path / "runs" / ".ledger", settings.budgets),
        emit=lambda ev, **f: events.append((ev, f)), sleep=lambda s: time.sleep(min(s, 0.2)),
    )  # fmt: skip
    assert run.run() == 0, [e for e in events if e[0] in ("failed", "cloud_status")][-3:]
    corpus = json.loads((run_dir / "cloud" / "corpus.json").read_text())
    assert [f.split("-", 1)[1] for f in corpus["files"]] == ["sft.jsonl", "my-tasks.jsonl"]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    merged = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    progress = {e["step"]: e.get("stage") for e in merged if e["event"] == "progress"}
    assert progress == {1: "rl", 2: "rl", 3: "rl", 4: "sft"}
    rollouts = [e for e in merged if e["event"] == "rollout"]
    assert rollouts and all(e["completions"] == 8 and 0.0 <= e["reward"] <= 1.0 for e in rollouts)
    assert [e for e in merged if e["event"] == "finished"][-1]["step"] == 4


@pytest.mark.slow
def test_rl_session_in_the_sagemaker_job_entry_trains_to_a_verified_model_dir(tmp_path: Path, wheel: Path) -> None:
    """The job side of SageMaker: the bundle channel (tasks file inside), the entry, the model dir."""
    import os
    import subprocess
    import sys

    from uff_port.cloud.verify import check_pull

    root = tmp_path / "ml"
    build_bundle(root / "input" / "data" / "bundle", validate_config(rl_tiny(tmp_path)).to_dict(), run_id="sm",
                 session="s0", wheel=wheel)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "KAGGLE_"))}
    env.update({"UFF_PORT_SM_ROOT": str(root), "SM_MODEL_DIR": str(root / "model"),
                "SM_CHANNEL_BUNDLE": str(root / "input" / "data" / "bundle"),
                "SM_HPS": json.dumps({"uff_max_runtime": "600", "uff_margin": "5", "uff_session": "s0"})})
    proc = subprocess.run([sys.executable, "-m", "uff_port.cloud.entry"], env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "checkpoints" / "run"
    assert json.loads((run_dir / "session.json").read_text())["finished"]
    assert check_pull(root / "model").ok
    assert (root / "model" / "run" / "final" / "adapter_model.safetensors").is_file()
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "rollout" for e in events) == 3
