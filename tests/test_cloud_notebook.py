"""Colab: a notebook run by hand, the run directory on Drive, a second run after a disconnect resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from uff_port.cli import main

CFG = {
    "name": "colab",
    "strategy": "kaggle",
    "data": {"path": "builtin:sample-corpus", "seq_len": 64},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 1, "device": "cpu",
                 "precision": "fp32", "progress_every_seconds": 0},
    "checkpoint": {"every_steps": 2},
    "eval": {"every_steps": None},
    "output": {"plot": False},
    "cloud": {"kaggle": {"session_hours": 1}},
}


def test_notebook_says_colab_has_no_job_api_and_runs_the_trainer_locally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "colab.yaml").write_text(yaml.safe_dump(CFG))
    out = tmp_path / "colab.ipynb"
    assert main(["notebook", "--platform", "colab", str(tmp_path / "colab.yaml"), "-o", str(out)]) == 0
    assert "no job API" in capsys.readouterr().err
    nb = json.loads(out.read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["accelerator"] == "GPU"
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert "no job API" in text and "drive.mount" in text and "uff_port.training" in text
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            compile("".join(cell["source"]), "cell", "exec")
    config = yaml.safe_load(eval(text.split("CONFIG = ", 1)[1].split(".replace", 1)[0]))  # noqa: S307 - our own literal
    assert config["strategy"] == "local" and "cloud" not in config


@pytest.mark.slow
def test_rerunning_the_notebook_after_a_disconnect_resumes(tmp_path: Path) -> None:
    cfg = {**CFG, "training": {**CFG["training"], "max_steps": 12}}
    (tmp_path / "colab.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "colab.ipynb"
    assert main(["notebook", "--platform", "colab", str(tmp_path / "colab.yaml"), "-o", str(out)]) == 0
    nb = json.loads(out.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    drive = tmp_path / "drive"
    run = drive / "uff-port" / "runs" / "colab"
    env = {**os.environ, "UFF_PORT_COLAB_DRIVE": str(drive)}
    # The runtime disconnects (everything killed) once a checkpoint is on Drive.
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*/manifest.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from uff_port.core.checkpoint_store import CheckpointStore

    saved = CheckpointStore(run).latest()
    assert saved is not None and saved.step < 12
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "exit 0" in again.stdout, again.stderr[-2000:]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if x.strip().endswith("}")]
    assert [e for e in events if e["event"] == "finished"][-1]["step"] == 12
    later = events[max(i for i, e in enumerate(events) if e["event"] == "state" and e.get("state") == "loading"):]
    resumed = [e["step"] for e in later if e["event"] == "progress"]
    assert resumed and min(resumed) > saved.step  # the second runtime went on from the checkpoint
