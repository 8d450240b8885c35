"""Real training runs of the tiny model through the real entry point."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from uff_port.protocol import FrameReader, decode_payload, encode_frame

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Small and quick, but every feature on: packing, eval, checkpoints, warm-up, clipping.
BASE: dict[str, Any] = {
    "name": "t",
    "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
    "data": {"path": "builtin:sample-corpus", "seq_len": 128, "eval_fraction": 0.05},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "training": {
        "max_steps": 6,
        "micro_batch_size": 2,
        "grad_accum_steps": 2,
        "learning_rate": 0.003,
        "warmup_steps": 2,
        "device": "cpu",
        "precision": "fp32",
        "progress_every_seconds": 0,
    },
    "checkpoint": {"every_steps": 3, "keep_last": 5},
    "eval": {"every_steps": 3, "max_batches": 2},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ)
    e["UFF_PORT_CACHE"] = str(tmp_path_factory.getbasetemp() / "uff-cache")
    e["OMP_NUM_THREADS"] = "1"
    e.pop(("UFF_PORT_INJECT_OOM_AT_STEP"), None)
    return e


def write_config(path: Path, **overrides: Any) -> Path:
    cfg = json.loads(json.dumps(BASE))
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events_of(run_dir) if e["event"] == "progress"}


def train(tmp: Path, name: str, env: dict[str, str], *args: str, **overrides: Any) -> tuple[int, Path]:
    run_dir = tmp / name
    cfg = write_config(tmp / f"{name}.yaml", **overrides)
    proc = subprocess.run(
        [PY, "-m", "uff_port.training", "--run-dir", str(run_dir), "--config", str(cfg), *args],
        env=env, cwd=ROOT, timeout=240, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode in (0, 1, 3, 75), proc.stderr[-3000:]
    return proc.returncode, run_dir


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    rc, run_dir = train(tmp, "base", env)
    assert rc == 0
    return run_dir


@pytest.mark.slow
def test_run_reports_checkpoints_and_saves_a_loadable_adapter(base_run: Path, env: dict[str, str]) -> None:
    evs = events_of(base_run)
    kinds = [e["event"] for e in evs]
    assert kinds.count("progress") == 6 and kinds[-1] == "finished"
    for e in evs:
        if e["event"] == "progress":
            assert {"step", "max_steps", "loss", "lr", "tokens_per_s"} <= set(e)
    assert [e["step"] for e in evs if e["event"] == "checkpoint"] == [3, 6]
    ev = [e for e in evs if e["event"] == "eval"]
    assert [e["step"] for e in ev] == [3, 6] and all(e["perplexity"] > 1 for e in ev)
    final = base_run / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "manifest.json").exists()
    # The adapter loads with plain peft and changes the model's output.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        "from uff_port.training.builtin import ensure_tiny_llama\n"
        "base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), local_files_only=True).eval()\n"
        "x = torch.arange(3, 40).unsqueeze(0)\n"
        "with torch.no_grad(): ref = base(x).logits\n"
        "m = PeftModel.from_pretrained(base, sys.argv[1]).eval()\n"
        "with torch.no_grad(): out = m(x).logits\n"
        "print((out - ref).abs().max().item())\n"
    )
    out = subprocess.run([PY, "-c", code, str(final)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 1e-3


@pytest.mark.slow
def test_loss_falls_on_the_tiny_preset(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(
        tmp_path, "learn", env, training__max_steps=30, training__micro_batch_size=4, checkpoint__every_steps=None,
        eval__every_steps=None,
    )  # fmt: skip
    assert rc == 0
    ls = losses(run_dir)
    first = sum(ls[s] for s in range(1, 4)) / 3
    last = sum(ls[s] for s in range(28, 31)) / 3
    assert last < first - 0.5, (first, last)


def test_full_loss_trains_like_the_chunked_default(base_run: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """training.loss: full (the logits path) gives the chunked default's losses, and a run
    checkpointed under one resumes under the other (the key is resume-neutral)."""
    rc, run_dir = train(tmp_path, "full", env, training__loss="full")
    assert rc == 0, events_of(run_dir)[-1]
    chunked, full = losses(base_run), losses(run_dir)
    assert sorted(chunked) == sorted(full) == list(range(1, 7))
    for step in chunked:
        assert full[step] == pytest.approx(chunked[step], rel=1e-5), step
    # The chunked run's checkpoint of step 3, resumed with the full loss, ends on its losses.
    point = base_run / "checkpoints" / "step-00000003"
    rc, cut = train(tmp_path, "switch", env, "--resume-from", str(point), training__loss="full")
    assert rc == 0, events_of(cut)[-1]
    resumed = losses(cut)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(chunked[step], rel=1e-5), step


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(base_run: Path, tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "ddp", env, distributed__nproc=2)
    assert rc == 0, events_of(run_dir)[-1]
    one, two = losses(base_run), losses(run_dir)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step
    assert (run_dir / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_injected_oom_backs_off_to_half_the_micro_batch(base_run: Path, tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "oom", {**env, "UFF_PORT_INJECT_OOM_AT_STEP": "3"})
    assert rc == 0
    evs = events_of(run_dir)
    backoff = [e for e in evs if e.get("code") == "oom_backoff"]
    assert len(backoff) == 1 and backoff[0]["micro_batch_size"] == 1 and backoff[0]["grad_accum"] == 4
    prog = {e["step"]: e for e in evs if e["event"] == "progress"}
    assert prog[2]["micro_batch_size"] == 2 and prog[3]["micro_batch_size"] == 1
    # Same global batch: the same losses as the run that never ran out of memory.
    one = losses(base_run)
    for step, value in losses(run_dir).items():
        assert value == pytest.approx(one[step], rel=1e-4, abs=1e-4), step


@pytest.mark.slow
def test_oom_at_micro_batch_one_fails_clearly(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(
        tmp_path, "oom1", {**env, "UFF_PORT_INJECT_OOM_AT_STEP": "2"}, training__micro_batch_size=1,
        training__grad_accum_steps=1, checkpoint__every_steps=1,
    )  # fmt: skip
    assert rc == 1
    failed = events_of(run_dir)[-1]
    assert failed["event"] == "failed" and failed["code"] == "out_of_memory"
    assert "micro_batch_size 1" in failed["message"] and failed["resumable"]


class Channel:
    """The worker's end of the trainer channel, as the worker uses it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(sock.fileno())
        self.events: list[dict[str, Any]] = []
        self.next_id = 1

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(encode_frame({"id": rid, "cmd": cmd, "args": args}))
        while True:
            msg = self.read()
            if msg.get("reply_to") == rid:
                return msg

    def read(self) -> dict[str, Any]:
        payload = self.reader.read()
        assert payload is not None, "trainer closed the channel"
        msg = decode_payload(payload)
        if "event" in msg:
            self.events.append(msg)
        return msg

    def wait_event(self, pred: Any) -> dict[str, Any]:
        while True:
            msg = self.read()
            if "event" in msg and pred(msg):
                return msg


def spawn(tmp: Path, name: str, env: dict[str, str], *args: str, **overrides: Any) -> tuple[subprocess.Popen[bytes], Channel, Path]:
    run_dir = tmp / name
    cfg = write_config(tmp / f"{name}.yaml", **overrides)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [PY, "-m", "uff_port.training", "--run-dir", str(run_dir), "--config", str(cfg),
         "--control-fd", str(theirs.fileno()), *args],
        env=env, cwd=ROOT, pass_fds=(theirs.fileno(),), stderr=open(tmp / f"{name}.stderr", "wb"),  # noqa: SIM115
    )  # fmt: skip
    theirs.close()
    return proc, Channel(ours), run_dir


@pytest.mark.slow
def test_channel_status_checkpoint_stop_then_exact_resume(tmp_path: Path, env: dict[str, str]) -> None:
    # Longer steps so that the commands land while training runs; dropout on, so the
    # resume must restore every RNG exactly (re-seeding after the restore would not).
    over = {"training__max_steps": 12, "data__seq_len": 256, "checkpoint__every_steps": None, "lora__dropout": 0.1}
    ref_rc, ref_dir = train(tmp_path, "ref", env, **over)
    assert ref_rc == 0
    proc, ch, run_dir = spawn(tmp_path, "chan", env, **over)
    ch.wait_event(lambda e: e["event"] == "progress" and e["step"] >= 2)
    st = ch.request("status")
    assert st["ok"] and st["result"]["max_steps"] == 12 and st["result"]["state"] == "training"
    cp = ch.request("checkpoint")
    assert cp["ok"] and Path(cp["result"]["path"]).is_dir() and cp["result"]["step"] >= 2
    stop = ch.request("stop")
    assert stop["ok"] and stop["result"]["checkpoint"]
    stopped_at = stop["result"]["step"]
    assert proc.wait(60) == 75
    assert stopped_at < 12
    # Resuming (no flags: the trainer finds the checkpoint) continues exactly.
    rc, _ = train(tmp_path, "chan", env, **over)
    assert rc == 0
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_sigterm_and_channel_eof_checkpoint_and_exit_75(tmp_path: Path, env: dict[str, str]) -> None:
    over = {"training__max_steps": 500, "checkpoint__every_steps": None}
    proc, ch, run_dir = spawn(tmp_path, "term", env, **over)
    ch.wait_event(lambda e: e["event"] == "progress")
    proc.send_signal(signal.SIGTERM)
    done = ch.wait_event(lambda e: e["event"] == "state" and e["state"] == "stopped")
    assert done["checkpoint"] and proc.wait(60) == 75
    proc, ch, run_dir = spawn(tmp_path, "eof", env, **over)
    ch.wait_event(lambda e: e["event"] == "progress")
    ch.sock.close()
    assert proc.wait(60) == 75
    assert [e for e in events_of(run_dir) if e["event"] == "checkpoint"]


def test_a_burst_of_signals_still_checkpoints_and_exits(tmp_path: Path, env: dict[str, str]) -> None:
    """A dead worker's parent-death SIGTERM plus a group kill arrive close together.

    The handler runs again inside itself; one that takes a lock deadlocks, and
    the trainer lives on as an orphan holding the run's writer lock.
    """
    over = {"training__max_steps": 500, "checkpoint__every_steps": None}
    proc, ch, run_dir = spawn(tmp_path, "burst", env, **over)
    ch.wait_event(lambda e: e["event"] == "progress")
    for i in range(400):
        proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
    assert proc.wait(60) == 75
    assert [e for e in events_of(run_dir) if e["event"] == "checkpoint"]


@pytest.mark.slow
def test_a_stop_right_after_a_periodic_checkpoint_reuses_it(tmp_path: Path, env: dict[str, str]) -> None:
    """Every step checkpoints: the stop's checkpoint is that step's, never written twice."""
    proc, ch, run_dir = spawn(tmp_path, "every", env, training__max_steps=500, checkpoint__every_steps=1)
    ch.wait_event(lambda e: e["event"] == "checkpoint" and e["step"] >= 2)
    stop = ch.request("stop")
    assert stop["ok"] and stop["result"]["checkpoint"]
    assert proc.wait(60) == 75
    steps = [e["step"] for e in events_of(run_dir) if e["event"] == "checkpoint"]
    assert len(steps) == len(set(steps)), steps
    assert Path(stop["result"]["checkpoint"]).name == f"step-{stop['result']['step']:08d}"


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_run_dir_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    """The first keeps the run's writer lock; the second waits grace_seconds, then says who holds it."""
    proc, ch, run_dir = spawn(tmp_path, "busy", env, training__max_steps=500, checkpoint__every_steps=None)
    try:
        ch.wait_event(lambda e: e["event"] == "progress")
        rc, _ = train(tmp_path, "busy", env, training__max_steps=500, checkpoint__grace_seconds=1)
        assert rc == 3
        (failed,) = [e for e in events_of(run_dir) if e["event"] == "failed"]
        assert failed["code"] == "busy" and failed["resumable"]
        assert f"pid {proc.pid}" in failed["message"]
        assert ch.request("status")["result"]["state"] == "training"  # the first runs on
    finally:
        ch.sock.close()
        assert proc.wait(60) == 75


@pytest.mark.slow
def test_max_runtime_stops_with_a_checkpoint(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "budget", env, training__max_steps=100000, training__max_runtime=8)
    assert rc == 75
    evs = events_of(run_dir)
    assert any(e["event"] == "checkpoint" for e in evs)
    assert evs[-1]["event"] == "state" and evs[-1]["state"] == "stopped"


def test_bad_config_is_refused_with_every_problem_by_path(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "bad", env, lora__r=0, training__max_steps=-1, data__managers=["xyz"])
    assert rc == 3
    failed = events_of(run_dir)[-1]
    assert failed["event"] == "failed" and failed["code"] == "invalid_config" and not failed["resumable"]
    text = "\n".join(failed["details"])
    assert "lora.r: must be > 0" in text and "training.max_steps: must be > 0" in text
    assert "data.managers" in text


def test_missing_model_weights_are_refused_naming_the_path(tmp_path: Path, env: dict[str, str]) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    rc, run_dir = train(tmp_path, "nomodel", env, model__name_or_path=str(empty))
    assert rc == 3
    failed = events_of(run_dir)[-1]
    assert failed["code"] == "model_not_found" and str(empty) in failed["message"]


def test_global_batch_must_split_evenly_across_processes(tmp_path: Path, env: dict[str, str]) -> None:
    rc, run_dir = train(tmp_path, "odd", env, training__grad_accum_steps=3, distributed__nproc=2)
    assert rc == 3
    failed = [e for e in events_of(run_dir) if e["event"] == "failed"][-1]
    assert "training.grad_accum_steps" in failed["message"]


def test_every_preset_is_a_valid_config() -> None:
    from uff_port.core.config import load_config

    names = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                   if p.name.startswith(("tiny", "deepseek", "adapter", "rl-")))
    assert len(names) == 19
    for p in names:
        cfg = load_config(p)
        assert p.read_text().startswith("#"), f"{p.name} must say its hardware and memory in a comment"
        if p.name.startswith("adapter-"):
            manager = p.stem.removeprefix("adapter-").removesuffix("-grpo")
            assert cfg.data.managers == [manager]
            assert (cfg.stage == "rl") == p.stem.endswith("-grpo")
    for p in (ROOT / "configs" / "deepspeed").glob("*.json"):
        assert "zero_optimization" in json.loads(p.read_text())


@pytest.mark.slow
def test_cli_status_reads_the_run_dir(base_run: Path, env: dict[str, str]) -> None:
    out = subprocess.run(
        [PY, "-m", "uff_port.cli", "status", str(base_run), "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["state"] == "finished" and info["step"] == 6 and info["checkpoints"][-1] == 6
    assert info["final"]


@pytest.mark.slow
def test_cli_train_draws_the_plot(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", training__max_steps=3, eval__every_steps=None, checkpoint__every_steps=None)
    t0 = time.monotonic()
    out = subprocess.run(
        [PY, "-m", "uff_port.cli", "train", str(cfg), "--run-dir", str(tmp_path / "cli"), "--quiet"],
        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "cli" / "training.png").stat().st_size > 1000
    assert time.monotonic() - t0 < 200


def test_adapter_save_load_round_trip_gives_identical_logits(tmp_path: Path, env: dict[str, str]) -> None:
    """In-process: the trainer's own model loader, then plain peft loading of what it saved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from uff_port.core.config import validate_config
    from uff_port.training.builtin import ensure_tiny_llama
    from uff_port.training.model import load_model, pick_precision

    tiny = ensure_tiny_llama(Path(env["UFF_PORT_CACHE"]))
    cfg = validate_config(json.loads(json.dumps(BASE)), {"model.name_or_path": str(tiny)})
    device = torch.device("cpu")
    model = load_model(cfg, device, pick_precision(cfg, device)).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would prove nothing
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        out = loaded(x).logits
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_at_the_same_global_position(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # Constant LR after warm-up, so max_steps may differ between the legs.
    over = {"training__lr_scheduler": "constant", "eval__every_steps": None}
    rc, ref_dir = train(tmp_path, "ref", env, **over)
    assert rc == 0
    rc, run_dir = train(tmp_path, "grow", env, distributed__nproc=2, training__max_steps=3, **over)
    assert rc == 0
    rc, _ = train(tmp_path, "grow", env, training__max_steps=6, **over)
    assert rc == 0
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-4), step
    resumed = [e for e in events_of(run_dir) if e.get("resumed_from") == 3]
    assert resumed


@pytest.mark.slow
def test_two_process_run_is_driven_through_the_relayed_channel(tmp_path: Path, env: dict[str, str]) -> None:
    proc, ch, run_dir = spawn(
        tmp_path, "ddpchan", env, distributed__nproc=2, training__max_steps=400, checkpoint__every_steps=None
    )
    ch.wait_event(lambda e: e["event"] == "progress" and e["step"] >= 2)
    st = ch.request("status")
    assert st["ok"] and st["result"]["state"] == "training"
    stop = ch.request("stop")
    assert stop["ok"] and Path(stop["result"]["checkpoint"]).is_dir()
    assert proc.wait(90) == 75  # rank 0's code, not torchrun's flattened 1
    assert json.loads((Path(stop["result"]["checkpoint"]) / "manifest.json").read_text())["world_size"] == 2


def test_status_and_stop_are_answered_while_the_model_loads(tmp_path: Path, env: dict[str, str]) -> None:
    proc, ch, run_dir = spawn(tmp_path, "loading", env)
    st = ch.request("status")  # queued during imports, answered by the loading watcher
    assert st["ok"] and st["result"]["state"] == "loading"
    stop = ch.request("stop")
    assert stop["ok"]
    assert proc.wait(60) == 75
