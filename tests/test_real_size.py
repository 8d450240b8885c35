"""DeepSeek-Coder at its real size: exact counts on the meta device, the real tokenizer size,
QLoRA's code path on CPU, and the real preset's path (train, SIGKILL, resume, PeftModel,
merge) end to end: on the tiny model always, on the 1.3B architecture when asked
(UFF_PORT_REAL_SIZE=1, ~10 minutes and ~7 GiB of RAM under /tmp/uff-bigmem.lock)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uff_port.planner.arch import BUILTIN, DEFAULT_TARGETS
from uff_port.planner.commands import PlanArgs, compute, public

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIGMEM_LOCK = os.environ.get("UFF_PORT_BIGMEM_LOCK", "/tmp/uff-bigmem.lock")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.parametrize("size", ["1.3b", "6.7b"])
def test_builder_config_is_the_planners_architecture(size: str) -> None:
    from uff_port.planner.arch import arch_from_config
    from uff_port.training.real_arch import REAL_CONFIGS

    cfg = REAL_CONFIGS[size]
    assert cfg["rope_scaling"] == {"factor": 4.0, "type": "linear"} and cfg["rope_theta"] == 100000
    got = arch_from_config(cfg, f"deepseek-coder-{size}", f"deepseek-ai/deepseek-coder-{size}-base")
    assert got == BUILTIN[f"deepseek-coder-{size}"]
    from uff_port.planner.arch import resolve_arch
    from uff_port.training.real_arch import builtin_name

    assert resolve_arch(builtin_name(size)) == BUILTIN[f"deepseek-coder-{size}"]  # plan/guard know the name


@pytest.mark.parametrize("size", ["1.3b", "6.7b"])
def test_planner_counts_equal_peft_on_meta(size: str) -> None:
    """Instantiated on the meta device (no memory): parameters and LoRA parameters, exactly."""
    from uff_port.training.real_arch import meta_model

    model = meta_model(size, lora_r=16, targets=DEFAULT_TARGETS)
    assert all(p.device.type == "meta" for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert model.get_nb_trainable_parameters() == (trainable, trainable + frozen)
    plan = public(compute(PlanArgs({"model": f"deepseek-coder-{size}", "gpus": "1x16GiB", "seq_len": 2048})))
    assert plan["model"]["n_params"] == frozen
    # LoRA adapters are fp32 (4 bytes) in the plain-torch candidates the planner ranks.
    lora_rows = [r for r in plan["summary"] if r["method"] in ("lora", "qlora") and r["strategy"] == "single"]
    assert lora_rows and all(r["gpu"]["trainable_params"] == 4 * trainable for r in lora_rows)
    expected = {"1.3b": (1_346_471_936, 14_991_360), "6.7b": (6_740_512_768, 39_976_960)}[size]
    assert (frozen, trainable) == expected


def test_real_tokenizer_has_the_real_vocabulary_size() -> None:
    from uff_port.training.real_arch import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE == 32256
    text = "def add(a, b):\n    return a + b\n"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and max(ids) < VOCAB_SIZE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<s><|user|>")


def test_unknown_real_size_is_named() -> None:
    from uff_port.training.builtin import resolve_model_path

    with pytest.raises(ValueError, match=r"sizes: \['1.3b', '6.7b'\]"):
        resolve_model_path("builtin:deepseek-coder-33b-random")


@pytest.mark.timeout(900)  # ~30 s alone; several trainer processes in a row on a loaded machine
@pytest.mark.long  # the same script's stages run in the gpu_check dry-run test below
def test_real_preset_path_on_tiny_model(tmp_path: Path) -> None:
    """The same script as the 1.3B run: train, SIGKILL after a checkpoint, resume bit-exactly,
    PeftModel.from_pretrained, and the merged export agreeing with it."""
    out = tmp_path / "out"
    proc = subprocess.run(
        # 30 steps: the tiny model trains fast, and the kill (seen by polling events.jsonl
        # every 0.5 s) must land before the run ends.
        [PY, "scripts/real_size_check.py", "--model", "builtin:tiny-llama", "--steps", "30", "--ckpt-every", "3",
         "--seq-len", "64", "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["run_b_killed"]["killed"] and r["run_b_killed"]["exit"] == -9
    resumed = r["resume"]["resumed_from_step"]
    assert resumed % 3 == 0 and 3 <= resumed < 30 and r["resume"]["bit_equal"], r["resume"]
    assert r["resume"]["final_adapters_bit_equal"]
    assert r["load_check"]["ok"] and r["load_check"]["lora_params"] > 0
    assert r["load_check"]["max_abs_logit_diff"] < 1e-4
    assert r["checkpoint_files"]["adapter_model.safetensors"] > 0 and r["merged_bytes"] > 0


# ---- QLoRA's code path ------------------------------------------------------


def test_nf4_trains_tiny_model_on_cpu(tmp_path: Path) -> None:
    """bitsandbytes >= 0.50 has CPU 4-bit kernels: QLoRA trains, evaluates, checkpoints, exports."""
    pytest.importorskip("bitsandbytes", reason="the dev extra installs bitsandbytes")
    run = tmp_path / "run"
    proc = subprocess.run(
        [PY, "-m", "uff_port.training", "--run-dir", str(run), "--config", "configs/tiny.yaml", "--fresh",
         "--set", "quantization.mode=nf4", "--set", "training.max_steps=4", "--set", "checkpoint.every_steps=2",
         "--set", "eval.every_steps=2", "--set", "training.progress_every_seconds=0"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )
    evs = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert proc.returncode == 0, [e for e in evs if e["event"] == "failed"] or proc.stderr[-2000:]
    losses = [e["loss"] for e in evs if e["event"] == "progress"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [e["step"] for e in evs if e["event"] == "eval"] == [2, 4]
    from safetensors.torch import load_file

    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)


def test_nf4_without_bitsandbytes_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from uff_port.protocol.errors import ErrorCode
    from uff_port.training.model import ModelError, require_nf4

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` sees when it is absent
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ModelError) as exc:
        require_nf4(torch.device("cpu"))
    assert exc.value.code == ErrorCode.NOT_AVAILABLE
    assert "bitsandbytes" in exc.value.message and "quantization.mode: none" in exc.value.message


def test_nf4_with_a_broken_bitsandbytes_fails_the_job_clearly(tmp_path: Path) -> None:
    """A trainer whose bitsandbytes cannot load refuses (exit 3) with `not_available` and the reason."""
    shim = tmp_path / "shim" / "bitsandbytes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    run = tmp_path / "run"
    env = _env() | {"PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [PY, "-m", "uff_port.training", "--run-dir", str(run), "--config", "configs/tiny.yaml", "--fresh",
         "--set", "quantization.mode=nf4", "--set", "training.max_steps=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    failed = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"failed"' in x]
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert failed and failed[-1]["code"] == "not_available"
    assert "bitsandbytes" in failed[-1]["message"] and "cannot open shared object" in failed[-1]["message"]


# ---- the 1.3B architecture end to end (opt-in) ------------------------------


@pytest.fixture
def bigmem_lock() -> Iterator[None]:
    """The machine-wide lock every real-size model load takes (`flock /tmp/uff-bigmem.lock`)."""
    with open(BIGMEM_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.mark.slow
@pytest.mark.timeout(7200)  # waiting for the machine-wide lock counts too
@pytest.mark.skipif(not os.environ.get("UFF_PORT_REAL_SIZE"),
                    reason="~10 min and ~7 GiB RAM: set UFF_PORT_REAL_SIZE=1 (docs/real-size.md)")
def test_deepseek_coder_1_3b_end_to_end(tmp_path: Path, bigmem_lock: None) -> None:
    """Build (once per cache), 10 LoRA steps, SIGKILL, exact resume, PeftModel load, merged export."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [PY, "scripts/real_size_check.py", "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["resume"]["bit_equal"] and r["resume"]["final_adapters_bit_equal"]
    assert r["load_check"]["ok"] and r["load_check"]["lora_params"] == 14_991_360
    assert r["merged_bytes"] > 5e9  # 1.35B parameters in fp32
    # The planner models what the process allocates while training (anonymous memory); the
    # resident peak at load adds the mmap'd bf16 checkpoint's pages (docs/real-size.md).
    ratio = r["planner_vs_measured"]["ratio_anon_training"]
    assert 0.9 < ratio < 1.2, r["planner_vs_measured"]


# ---- scripts/gpu_check.sh ---------------------------------------------------


def test_gpu_check_script_parses() -> None:
    assert subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT).returncode == 0


def test_gpu_check_dry_run_keeps_going_past_a_timed_out_stage(tmp_path: Path) -> None:
    """The GPU session's script on CPU (tiny model): a stage killed by its timeout is recorded
    and the later stages still write their figures."""
    out = tmp_path / "out"
    env = _env() | {
        "UFF_PORT_PYTHON": PY,
        "GPU_CHECK_STAGES": "setup telemetry bench-1.3b",
        "GPU_CHECK_LIMIT_SETUP": "2", "GPU_CHECK_MIN_STAGE_S": "1",  # setup imports torch: > 2 s
        "GPU_CHECK_WORK": str(tmp_path / "work"),
    }
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setup"]["rc"] == "124"  # timeout(1)'s status: the stage was killed
    assert {k: summary[k]["rc"] for k in ("telemetry", "bench-1.3b")} == {"telemetry": "0", "bench-1.3b": "0"}
    assert "build-1.3b" not in summary  # not among GPU_CHECK_STAGES
    assert summary["bench-1.3b"]["figures"][0]["tokens_per_s"] > 0
    assert summary["bench-1.3b"]["figures"][0]["planner_estimate_mib"] > 0
    beats = json.loads((out / "heartbeat.json").read_text())["heartbeats"]
    assert len(beats) == 3 and all("gpus" in b for b in beats)
    samples = [json.loads(x) for x in (out / "nvml.jsonl").read_text().splitlines()]
    assert samples and all(s["gpus"] == [] for s in samples)  # no GPU here: empty, never an error
