"""Hostile and careless input through the real worker and the real CLI.

Every attack gets a coded answer naming the field, leaks nothing of the files
it points at, leaves the worker answering `ping`, and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import yaml

from uff_port.client import WorkerClient, WorkerError
from uff_port.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MEMORY_CAP = 1 << 30  # the idle worker maps ~0.4 GiB; the unbounded bomb needs many GiB

SECRETS = [
    "root:$6$SECRETHASHroot0123456789abcdef:19000:0:99999:7:::",
    "svc:$6$SECRETHASHsvc0123456789abcdef:19000:0:99999:7:::",
    "api_key: SECRETTOKEN-0123456789",
    "- SECRETLISTITEM",
]


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def alias_bomb(levels: int = 9) -> str:
    """The classic: each level lists the previous one ten times, nine levels deep (10^9 strings)."""
    lines = ["name: bomb", "cloud:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _train_error(worker: WorkerClient, args: dict[str, Any], timeout: float = 10.0) -> WorkerError:
    start = time.monotonic()
    with pytest.raises(WorkerError) as exc:
        worker.request("train", args, timeout=timeout)
    assert time.monotonic() - start < timeout
    return exc.value


def _tree(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _gone(pids: list[int], timeout: float = 30) -> bool:
    """Nothing the worker started outlives it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_alias_bomb_is_refused_under_a_memory_cap(tmp_path: Path, runs_root: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    with WorkerClient(runs_root=runs_root, heartbeat_interval=0.5, preexec_fn=_cap_memory) as w:
        err = _train_error(w, {"config_path": str(bomb)})
        assert err.code == "invalid_config"
        assert "alias" in err.message and str(bomb) in err.message
        assert w.request("ping")["pong"] is True
        assert w.request("status")["state"] == "idle"
        assert _tree(w.pid) == []
        w.close_stdin()
        assert w.wait(30) == 0
    assert list(runs_root.iterdir()) == []


def test_alias_bomb_on_the_command_line_is_refused_at_once(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    start = time.monotonic()
    proc = subprocess.run(
        [PY, "-m", "uff_port", "train", str(bomb), "--run-dir", str(tmp_path / "run"), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, preexec_fn=_cap_memory,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "alias" in proc.stderr and time.monotonic() - start < 60


def test_config_path_contents_are_never_echoed(tmp_path: Path, worker: WorkerClient) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("\n".join(SECRETS[:2]) + "\n")
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(SECRETS[2] + "\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [\n" + SECRETS[2] + "\n  x: 'SECRETQUOTED\n")
    listed = tmp_path / "list.yaml"
    listed.write_text(SECRETS[3] + "\n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: SECRETLATIN\xe9\n")
    cases = {shadow: "unknown key", keyed: "unknown key", broken: "not valid YAML at line",
             listed: "must hold a map, got list", binary: "binary file", latin: "not UTF-8",
             tmp_path: "is a directory"}  # fmt: skip
    for path, expect in cases.items():
        reply = w_call(worker, {"config_path": str(path)})
        assert reply["error"]["code"] == "invalid_config", reply
        assert expect in reply["error"]["message"], reply
        text = json.dumps(reply)
        assert "SECRET" not in text, text
    assert worker.request("ping")["pong"] is True


def w_call(worker: WorkerClient, args: dict[str, Any]) -> dict[str, Any]:
    reply = worker.call("train", args, timeout=10)
    assert reply["ok"] is False
    return reply


def test_deep_odd_and_non_finite_configs_are_invalid_config(tmp_path: Path, worker: WorkerClient) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(900):
        node["a"] = {}
        node = node["a"]
    inf_file = tmp_path / "inf.yaml"
    inf_file.write_text("training:\n  learning_rate: .inf\n")
    nan_file = tmp_path / "nan.yaml"
    nan_file.write_text("checkpoint:\n  every_seconds: .nan\n")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"config": {"cloud": deep}}, "nested deeper than 32 levels"),
        ({"config": {}, "overrides": {"cloud." + "a." * 40 + "b": 1}}, "nested deeper than 32 levels"),
        ({"config": {"cloud": {"x": [1] * 100_001}}}, "more than 100000 values"),
        ({"config": {"training": {"max_steps": True}}}, "training.max_steps: expected an integer, got boolean"),
        ({"config": {"training": {"learning_rate": "1e-3"}}}, "training.learning_rate: expected a number, got string"),
        ({"config": {"training": {"learning_rate": None}}}, "training.learning_rate: expected a number, got null"),
        ({"config": {"cloud": {"blob": b"\x00\x01"}}}, "cloud.blob: expected a map, list"),
        ({"config_path": str(inf_file)}, "training.learning_rate: must be a finite number"),
        ({"config_path": str(nan_file)}, "checkpoint.every_seconds: must be a finite number"),
    ]
    for args, expect in cases:
        err = _train_error(worker, args)
        assert err.code == "invalid_config", (args, err)
        assert expect in err.message, (expect, err.message)
    # Our client sends NaN/Inf as nil, like the worker; another client may not.
    raw = [
        ({"config": {"training": {"learning_rate": float("inf")}}}, "training.learning_rate: must be a finite number"),
        ({"config": {}, "overrides": {"lora.alpha": float("nan")}}, "lora.alpha: must be a finite number"),
        ({"config": {"cloud": {"budgets": {"x": float("-inf")}}}}, "cloud.budgets.x: must be a finite number"),
    ]
    for rid, (args, expect) in enumerate(raw, start=1000):
        payload = msgpack.packb({"id": rid, "cmd": "train", "args": args}, use_bin_type=True)
        worker.send_raw(struct.pack(">I", len(payload)) + payload)
        reply = _unmatched_reply(worker, rid)
        assert reply["error"]["code"] == "invalid_config" and expect in reply["error"]["message"], reply
    assert worker.request("status")["state"] == "idle"


def _unmatched_reply(worker: WorkerClient, rid: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in list(worker.unmatched):
            if frame.get("id") == rid:
                return frame
        time.sleep(0.01)
    raise TimeoutError(f"no reply to request {rid}")


def test_yaml_exponent_floats_are_numbers_and_presets_validate(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\n  max_grad_norm: 5E+0\n")
    cfg = load_config(path)
    assert cfg.training.learning_rate == 1e-3 and cfg.training.max_grad_norm == 5.0
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        if preset.name != "gates.yaml":
            load_config(preset)


def test_run_dir_and_job_id_are_checked(worker: WorkerClient, runs_root: Path) -> None:
    cases = [
        ({"run_dir": "x" * 5000}, "args.run_dir"),
        ({"run_dir": "a/" + "y" * 300}, "args.run_dir"),
        ({"run_dir": "line\nbreak"}, "args.run_dir"),
        ({"run_dir": "tab\there"}, "args.run_dir"),
        ({"run_dir": "esc\x1b[2J"}, "args.run_dir"),
        ({"run_dir": "ok", "job_id": "job\n"}, "args.job_id"),
        ({"run_dir": "ok", "job_id": "a\x00b"}, "args.job_id"),
    ]
    for extra, field in cases:
        err = _train_error(worker, {"config_path": "tiny", **extra})
        assert err.code == "invalid_args", (extra, err)
        assert err.details["fields"][0]["field"] == field
    assert list(runs_root.iterdir()) == []
    assert worker.request("status")["state"] == "idle"


@pytest.fixture(scope="module")
def train_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["UFF_PORT_CACHE"] = str(tmp_path_factory.getbasetemp() / "uff-cache")
    env["OMP_NUM_THREADS"] = "1"
    return env


TINY: dict[str, Any] = {
    "name": "hostile",
    "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
    "data": {"seq_len": 64, "eval_fraction": 0.0},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 0,
                 "device": "cpu", "precision": "fp32", "cpu_threads": 1},
    "checkpoint": {"every_steps": None},
    "eval": {"every_steps": None},
    "output": {"plot": False},
}  # fmt: skip


@pytest.mark.slow
def test_data_path_directory_fails_clearly_and_shutdown_right_after_exits_zero(
    tmp_path: Path, runs_root: Path, train_env: dict[str, str]
) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["path"] = str(tmp_path)
    with WorkerClient(runs_root=runs_root, heartbeat_interval=0.5, env=train_env) as w:
        # Refused by the worker before anything starts, with no run directory made.
        with pytest.raises(WorkerError) as refused:
            w.request("train", {"config": cfg, "run_dir": "dir-data"})
        assert refused.value.code == "data_not_found" and "a directory?" in refused.value.message
        assert not (runs_root / "dir-data").exists()
        # A corpus the trainer refuses (every line bad) still fails fast, and a shutdown right after exits 0.
        (tmp_path / "bad.jsonl").write_text("not json\n" * 20)
        cfg["data"]["path"] = str(tmp_path / "bad.jsonl")
        shutdown: dict[str, Any] = {}

        def on_failed(event: dict[str, Any]) -> None:
            if event.get("event") == "failed" and not shutdown:  # at once, from the reader thread
                shutdown["id"] = 99
                w.send_frame({"id": 99, "cmd": "shutdown"})

        w.on_event(on_failed)
        w.request("train", {"config": cfg, "run_dir": "dir-data"})
        started = _tree(w.pid)
        failed = w.wait_event("failed", timeout=180)
        assert failed["code"] == "too_many_bad_lines" and "20 of 20 lines are bad" in failed["message"]
        assert w.wait(60) == 0
    assert _gone(started)


@pytest.mark.slow
def test_giant_lines_are_skipped_unread_and_the_run_finishes(tmp_path: Path, train_env: dict[str, str]) -> None:
    from uff_port.training.builtin import sample_corpus_path

    corpus = tmp_path / "corpus.jsonl"
    normal = sample_corpus_path().read_text().splitlines()[:60]
    with open(corpus, "w") as fh:
        fh.write(normal[0] + "\n")
        fh.write(json.dumps({"text": "x" * (2 << 20)}) + "\n")  # line 2: valid JSON over the limit
        fh.write(normal[1] + "\n")
        fh.flush()
        fh.truncate(fh.tell() + (512 << 20))  # line 4: a 512 MiB line of NULs, sparse on disk
        fh.seek(0, os.SEEK_END)
        fh.write("\n" + "\n".join(normal[2:]) + "\n")
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update(path=str(corpus), max_line_bytes=1 << 20)
    config = tmp_path / "giant.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    # A parent of its own, so RUSAGE_CHILDREN's peak RSS is the CLI's and its trainer's only.
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
    )
    proc = subprocess.run(
        [PY, "-c", wrapper, PY, "-m", "uff_port", "train", str(config), "--run-dir", str(run_dir), "--quiet"],
        cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mib = int(proc.stdout.split()[-1]) // 1024
    assert peak_mib < 1024, f"trainer peak RSS {peak_mib} MiB: the giant line was loaded"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    bad = [e for e in events if e.get("code") == "bad_line"]
    assert [(e["file"], e["line"]) for e in bad] == [("corpus.jsonl", 2), ("corpus.jsonl", 4)]
    assert all("data.max_line_bytes" in e["message"] for e in bad)
    assert any(e["event"] == "finished" for e in events)


def test_client_wait_finished_returns_at_once_after_a_refused_train(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [PY, "-m", "uff_port", "client", "train config_path=no-such-preset", "--wait-finished", "--quiet",
         "--runs-root", str(tmp_path / "runs"), "--heartbeat-interval", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "invalid_config" in proc.stdout and "nothing to wait for" in proc.stderr
    assert time.monotonic() - start < 30


_ONE_LINE_BOMB = "[" + ", ".join(
    ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
) + "]"


def test_every_user_yaml_is_read_within_the_config_limits(tmp_path: Path) -> None:
    # Gates and SLO files, `--set` values and the client's key=value arguments are user input
    # too: an alias bomb in any of them is refused with its coded error, under a memory cap.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    script = """
import sys
from uff_port.core.config import ConfigError
from uff_port.registry.errors import RegistryError
from uff_port.registry.gates import load_gates
from uff_port.registry.watch import load_slo
from uff_port.training.__main__ import parse_overrides
from uff_port.client_cli import parse_request_line as parse_request
bomb, line = sys.argv[1], sys.argv[2]
for load, code in ((load_gates, "invalid_gates"), (load_slo, "invalid_slo")):
    try:
        load(bomb)
    except RegistryError as exc:
        assert exc.code == code and "alias" in exc.message, exc.message
    else:
        raise SystemExit("accepted: " + load.__name__)
try:
    parse_overrides(["cloud.x=" + line])
except ConfigError as exc:
    assert "alias" in str(exc), str(exc)
else:
    raise SystemExit("accepted: --set")
try:
    parse_request("train overrides=" + repr(line))
except ValueError as exc:
    assert "alias" in str(exc), str(exc)
else:
    raise SystemExit("accepted: client")
print("ok")
"""
    proc = subprocess.run([PY, "-c", script, str(bomb), _ONE_LINE_BOMB], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, preexec_fn=_cap_memory)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:] + proc.stdout
