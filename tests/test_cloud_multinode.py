"""Two "nodes" on loopback (gloo, one CPU process each) equal one process at the same global batch,
also when both are killed after a checkpoint and started again; SageMaker hosts map onto torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from uff_port.cloud.fakes import kill_tree
from uff_port.core.checkpoint_store import CheckpointStore

CFG: dict[str, Any] = {
    "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
    "data": {"path": "builtin:sample-corpus", "seq_len": 64},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 1, "device": "cpu",
                 "precision": "fp32", "progress_every_seconds": 0, "learning_rate": 0.003},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "eval": {"every_steps": None},
    "output": {"plot": False},
}


def _losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "events.jsonl").read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "progress":
            out[int(ev["step"])] = ev["loss"]
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nodes(run: Path, cfg_path: Path, port: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "UFF_PORT_NODE_RANK": str(rank), "UFF_PORT_MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uff_port.training", "--run-dir", str(run), "--config", str(cfg_path),
             "--set", f"distributed.master_port={port}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        ))
    return procs


@pytest.mark.slow
def test_two_loopback_nodes_equal_one_process_and_resume_after_both_are_killed(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(CFG))
    one = subprocess.run([sys.executable, "-m", "uff_port.training", "--run-dir", str(tmp_path / "one"),
                          "--config", str(tmp_path / "one.yaml")], capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    reference = _losses(tmp_path / "one")

    two = {**CFG, "distributed": {"nproc": 1, "nnodes": 2}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    run = tmp_path / "two"  # a shared filesystem, as /opt/ml/checkpoints restored on every host
    procs = _nodes(run, tmp_path / "two.yaml", _port())
    deadline = time.time() + 240
    while time.time() < deadline and (CheckpointStore(run).latest() is None) and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    saved = CheckpointStore(run).latest()
    assert saved is not None, [p.stderr.read()[-2000:] for p in procs if p.poll() is not None and p.stderr]
    for p in procs:
        kill_tree(p.pid)
        p.wait()
    assert saved.step < 8
    procs = _nodes(run, tmp_path / "two.yaml", _port())
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    losses = _losses(run)
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    states = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"world_size"' in x]
    assert any(e.get("world_size") == 2 for e in states)
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_sagemaker_hosts_become_torchrun_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uff_port.cloud.entry import _map_hosts
    from uff_port.cloud.environment import Platform
    from uff_port.cloud.settings import validate_cloud
    from uff_port.core.config import validate_config
    from uff_port.training.torchrun_launcher import _node_args

    monkeypatch.setenv("SM_HOSTS", json.dumps(["algo-2", "algo-1"]))
    monkeypatch.setenv("SM_CURRENT_HOST", "algo-2")
    for name in ("UFF_PORT_NODE_RANK", "UFF_PORT_MASTER_ADDR"):
        monkeypatch.setenv(name, "unset")  # restored after the test: _map_hosts sets them for the trainer
    platform = Platform("sagemaker", tmp_path, tmp_path, tmp_path, 100.0, {})
    cfg: dict[str, Any] = {}
    assert _map_hosts(platform, cfg) is False  # algo-1 is node 0
    assert cfg["distributed"] == {"nnodes": 2, "master_port": 29500}
    assert os.environ["UFF_PORT_NODE_RANK"] == "1" and os.environ["UFF_PORT_MASTER_ADDR"] == "algo-1"
    # Two nodes split the global batch: its accumulation must divide by them (checked at validation).
    args = _node_args(validate_config({**cfg, "training": {"grad_accum_steps": 2}}))
    assert args == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "algo-1"]
    assert validate_cloud({"sagemaker": {"instance_count": 2}}).sagemaker.instance_count == 2
