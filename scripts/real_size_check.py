"""The real preset's path at real size: train, SIGKILL, exact resume, PeftModel load, merged export.

    flock /tmp/uff-bigmem.lock python scripts/real_size_check.py --out /tmp/real-1.3b
    python scripts/real_size_check.py --model builtin:tiny-llama --out /tmp/real-tiny   # the same path, seconds
    python scripts/real_size_check.py --device cuda --seq-len 2048 --micro-batch 4 --out OUT   # on a GPU
    python scripts/real_size_check.py --preset configs/deepseek-coder-1.3b-grpo-16gb.yaml \
        --device cuda --cap-gib 16 --steps 4 --ckpt-every 2 --out OUT   # GRPO, as on a 16 GB card

Runs configs/deepseek-coder-1.3b-lora-16gb.yaml (or `--preset`: LoRA on all projections,
gradient checkpointing, dropout 0.05) with `model.name_or_path` set to the
local directory of the real architecture with random weights (built once,
uff_port/training/real_arch.py), through `python -m uff_port.training`, the
very process the worker starts. Scaled only where time forces it: sequence
length, micro-batch, accumulation, steps, fp32 on CPU.

1. run A: `--steps` steps uninterrupted, a checkpoint every `--ckpt-every`;
2. run B: the same config, SIGKILLed (whole process group) once its first
   checkpoint is durable and it has stepped past it; then resumed to the end
   with the merged export on;
3. losses of every step of B (killed + resumed) against A, bit for bit, and
   the final adapters' tensors against each other;
4. a fresh process loads the base and `PeftModel.from_pretrained(final/)`
   and compares its logits with `final/merged` loaded on its own.

For an RL preset (`stage: rl`) the rollout's mean reward of every step is compared
too, and the rollout figures (generation and update tokens/s) are reported.
`--cap-gib` holds the trainer to that much GPU memory
(`torch.cuda.set_per_process_memory_fraction`), as a 16 GB card would.

Writes OUT/result.json (every figure: s/step, peak RSS of each process via
wait4, checkpoint bytes and save seconds, export seconds, the planner's CPU
estimate for the same shapes) and prints it. Exit 0 when the resume is
bit-exact (or within --tolerance) and the loads agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESET = ROOT / "configs" / "deepseek-coder-1.3b-lora-16gb.yaml"
CAP_GIB: float | None = None


def overrides(a: argparse.Namespace, model: str, merge: bool) -> dict[str, Any]:
    on_cpu = a.device == "cpu"
    return {
        "model.name_or_path": model,
        "model.local_files_only": True,
        "data.seq_len": a.seq_len,
        "data.eval_fraction": 0.0,
        "training.max_steps": a.steps,
        "training.micro_batch_size": a.micro_batch,
        "training.grad_accum_steps": a.grad_accum,
        "training.warmup_steps": 2,
        "training.device": a.device,
        "training.precision": "fp32" if on_cpu else a.precision,
        "training.progress_every_seconds": 0,
        **({"training.cpu_threads": a.threads} if on_cpu else {}),
        "checkpoint.every_steps": a.ckpt_every,
        "checkpoint.every_seconds": None,
        "checkpoint.keep_last": 2,
        "eval.every_steps": None,
        "output.merge": merge,
        "output.plot": False,
        **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)},
    }


# The trainer's own entry point, behind a CUDA memory cap (what a smaller card would allow).
CAPPED = ("import runpy, sys, torch; total = torch.cuda.get_device_properties(0).total_memory; "
          "torch.cuda.set_per_process_memory_fraction(min(1.0, float(sys.argv.pop(1)) * 2**30 / total), 0); "
          "runpy.run_module('uff_port.training', run_name='__main__', alter_sys=True)")


def _argv(run_dir: Path, ov: dict[str, Any], fresh: bool) -> list[str]:
    entry = ["-c", CAPPED, str(CAP_GIB)] if CAP_GIB else ["-m", "uff_port.training"]
    cmd = [sys.executable, *entry, "--run-dir", str(run_dir), "--config", str(PRESET)]
    for k, v in ov.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]  # JSON scalars are YAML scalars
    return cmd + (["--fresh"] if fresh else [])


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by the SIGKILL
    return out


def run_trainer(run_dir: Path, ov: dict[str, Any], fresh: bool, kill_after_step: int | None = None,
                timeout: float = 3600.0) -> dict[str, Any]:
    """One trainer process, optionally SIGKILLed mid-run; its memory sampled every 0.1 s.

    Peak RSS comes from wait4 (exact). RSS counts the pages of the mmap'd safetensors
    file that loading touched; `anon` (RSS less file-backed and shared pages) is what
    the process itself allocated, the quantity the planner models. Both are also
    reported from the first optimizer step on, apart from loading.
    """
    import psutil

    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    peak: dict[str, int] = {"anon": 0, "rss_training": 0, "anon_training": 0}
    with open(run_dir / f"trainer-{int(time.time() * 1000)}.stderr", "wb") as err:
        proc = subprocess.Popen(_argv(run_dir, ov, fresh), stdout=err, stderr=err, start_new_session=True)
        ps = psutil.Process(proc.pid)
        killed = False
        last_read = 0.0
        stepped = 0
        ckpt = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit(f"trainer in {run_dir} ran past {timeout} s")
            try:
                mem = ps.memory_info()
                anon = mem.rss - mem.shared
                peak["anon"] = max(peak["anon"], anon)
                if stepped:
                    peak["rss_training"] = max(peak["rss_training"], mem.rss)
                    peak["anon_training"] = max(peak["anon_training"], anon)
            except psutil.Error:
                pass
            if time.monotonic() - last_read > 0.5:
                last_read = time.monotonic()
                evs = events(run_dir)
                ckpt = any(e.get("event") == "checkpoint" for e in evs)
                stepped = max((e.get("step", 0) for e in evs if e.get("event") == "progress"), default=0)
                if kill_after_step is not None and not killed and ckpt and stepped >= kill_after_step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit": proc.returncode, "killed": killed, "seconds": round(time.monotonic() - t0, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_bytes": peak["anon"],
            "peak_rss_training_bytes": peak["rss_training"], "peak_anon_training_bytes": peak["anon_training"]}


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a resumed run's later record of a step wins (they must agree anyway)."""
    return {e["step"]: e["loss"] for e in events(run_dir) if e.get("event") == "progress"}


def figures(run_dir: Path) -> dict[str, Any]:
    evs = events(run_dir)
    steps = [e["step_seconds"] for e in evs if e.get("event") == "progress" and "step_seconds" in e]
    ckpts = [e for e in evs if e.get("event") == "checkpoint"]
    saving = [e["ts"] for e in evs if e.get("event") == "state" and e.get("state") == "saving"]
    saved = [e["ts"] for e in evs if e.get("event") == "log" and "final adapter saved" in str(e.get("message"))]
    return {
        # The first step of each process pays for lazy initialisation: left out of the median.
        "s_per_step_median": statistics.median(steps[1:]) if len(steps) > 1 else None,
        "s_per_step_spread": [min(steps[1:]), max(steps[1:])] if len(steps) > 1 else None,
        "checkpoint_bytes": [e.get("bytes") for e in ckpts],
        "checkpoint_seconds": [e.get("seconds") for e in ckpts],
        "checkpoint_blocked_seconds": [e.get("blocked_seconds") for e in ckpts],
        "final_export_seconds": round(saved[-1] - saving[-1], 2) if saved and saving else None,
        "peak_memory": [{"bytes": e["peak_memory_bytes"], "of": e.get("peak_memory_of")}
                        for e in evs if e.get("event") == "log" and "peak_memory_bytes" in e],
        **_rollout_figures(evs),
    }


def _rollout_figures(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """RL runs: generation and update throughput (first rollout of a process left out), rewards."""
    ro = [e for e in evs if e.get("event") == "rollout"]
    if not ro:
        return {}

    def med(key: str) -> float | None:
        vals = [float(e[key]) for e in ro[1:] if isinstance(e.get(key), (int, float))]
        return round(statistics.median(vals), 1) if vals else None

    return {"rollouts": len(ro), "gen_tokens_per_s_median": med("gen_tokens_per_s"),
            "update_tokens_per_s_median": med("update_tokens_per_s"),
            "completion_length": [e.get("completion_length") for e in ro]}


def rewards(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["reward"] for e in events(run_dir) if e.get("event") == "rollout"}


def planner_estimate(model: str, ov: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    from uff_port.core.config import load_config
    from uff_port.planner.guard import check_config

    cfg = load_config(PRESET, ov)
    cap = int((CAP_GIB or 16) * 2**30)
    devices = [{"memory_total": cap}] if on_gpu else []
    rep = check_config(cfg, devices)
    return {"checked": rep.checked, "estimate": rep.estimate, "message": rep.message}


def adapter_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return ta.keys() == tb.keys() and all(bool((ta[k] == tb[k]).all()) for k in ta)


LOAD_CHECK = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, final, device = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
ids = torch.randint(3, 1000, (1, 32), device=device)
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True).to(device)
m = PeftModel.from_pretrained(m, final, is_trainable=False).eval()
n_lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
with torch.no_grad():
    a = m(input_ids=ids).logits.float().cpu()
del m
merged = AutoModelForCausalLM.from_pretrained(final + "/merged", local_files_only=True)
dtype = str(next(merged.parameters()).dtype)  # as saved: fp32 from a CPU run, bf16 from a GPU run
m = merged.float().to(device).eval()
with torch.no_grad():
    b = m(input_ids=ids).logits.float().cpu()
print(json.dumps({"lora_params": n_lora, "merged_dtype": dtype,
                  "max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max())}))
"""


def load_check(model_dir: str, final: Path, device: str) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", LOAD_CHECK, model_dir, str(final), device],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"ok": False, "error": err[-2000:]}
    res = json.loads(out.strip().splitlines()[-1])
    return {"ok": True, **res, "peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": round(time.monotonic() - t0, 2)}


def main() -> int:
    global PRESET, CAP_GIB
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="builtin:deepseek-coder-1.3b-random",
                    help="a builtin name or a local model directory")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="auto", help="on cuda (CPU runs fp32)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--preset", type=Path, default=PRESET, help="the training config (an RL preset too)")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="cuda: hold the trainer to this much GPU memory (a 16 GB card: 16)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another config override (YAML value), e.g. training.deterministic=true")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="largest |loss difference| accepted between resumed and uninterrupted runs")
    a = ap.parse_args()
    PRESET, CAP_GIB = a.preset.resolve(), (a.cap_gib if a.device == "cuda" else None)
    if a.ckpt_every >= a.steps:
        ap.error("--ckpt-every must be below --steps (the kill lands after the first checkpoint)")
    a.out.mkdir(parents=True, exist_ok=True)
    from uff_port.training.builtin import resolve_model_path

    t0 = time.monotonic()
    model_dir = resolve_model_path(a.model)  # builds once, then returns the cached directory
    result: dict[str, Any] = {"model": a.model, "model_dir": model_dir, "device": a.device,
                              "prepare_model_seconds": round(time.monotonic() - t0, 2),
                              "shape": {"seq_len": a.seq_len, "micro_batch": a.micro_batch,
                                        "grad_accum": a.grad_accum, "steps": a.steps, "threads": a.threads}}
    plain, merged = overrides(a, model_dir, False), overrides(a, model_dir, True)
    result["planner"] = planner_estimate(model_dir, plain, a.device == "cuda")

    run_a, run_b = a.out / "uninterrupted", a.out / "killed"
    result["run_a"] = run_trainer(run_a, plain, fresh=True) | figures(run_a)
    result["run_b_killed"] = run_trainer(run_b, merged, fresh=True, kill_after_step=a.ckpt_every + 1)
    result["run_b_resumed"] = run_trainer(run_b, merged, fresh=False) | figures(run_b)
    la, lb = losses(run_a), losses(run_b)
    diffs = [abs(la[s] - lb[s]) for s in sorted(la) if s in lb]
    ra, rb = rewards(run_a), rewards(run_b)
    rdiffs = [abs(ra[s] - rb[s]) for s in sorted(ra) if s in rb]
    resumed_from = next((e.get("resumed_from") for e in events(run_b)
                         if e.get("event") == "state" and e.get("resumed_from")), None)
    result["resume"] = {
        "resumed_from_step": resumed_from,
        "losses_uninterrupted": [la[s] for s in sorted(la)],
        "losses_killed_and_resumed": [lb[s] for s in sorted(lb)],
        "steps_compared": len(diffs),
        "bit_equal": len(diffs) == a.steps and all(d == 0.0 for d in diffs + rdiffs),
        "rewards_compared": len(rdiffs),
        "max_abs_reward_diff": max(rdiffs) if rdiffs else None,
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "final_adapters_bit_equal": adapter_equal(run_a / "final", run_b / "final")
        if (run_a / "final").exists() and (run_b / "final").exists() else False,
    }
    if a.device == "cpu" and result["planner"]["estimate"]:
        est = sum(result["planner"]["estimate"]["cpu"].values()) if isinstance(
            result["planner"]["estimate"].get("cpu"), dict) else None
        runs = (result["run_a"], result["run_b_resumed"])
        peak = max(r["peak_rss_bytes"] for r in runs)
        anon = max(r["peak_anon_training_bytes"] for r in runs)
        result["planner_vs_measured"] = {
            "estimate_bytes": est, "measured_peak_rss_bytes": peak,
            "ratio": round(est / peak, 3) if est else None,
            "measured_peak_anon_training_bytes": anon,
            "ratio_anon_training": round(est / anon, 3) if est and anon else None,
        }
    result["load_check"] = load_check(model_dir, run_b / "final", a.device)
    ckpt_dir = run_b / "checkpoints"
    result["checkpoint_files"] = {p.name: p.stat().st_size for c in sorted(ckpt_dir.glob("*"))[-1:]
                                  for p in sorted(c.rglob("*")) if p.is_file()} if ckpt_dir.exists() else {}
    merged_dir = run_b / "final" / "merged"
    result["merged_bytes"] = sum(p.stat().st_size for p in merged_dir.rglob("*") if p.is_file()) \
        if merged_dir.exists() else None
    (a.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    lc = result["load_check"]
    exact = result["resume"]["bit_equal"] or (
        result["resume"]["max_abs_loss_diff"] is not None and result["resume"]["max_abs_loss_diff"] <= a.tolerance
        and result["resume"]["steps_compared"] == a.steps)
    ok = (exact and result["run_a"]["exit"] == 0 and result["run_b_resumed"]["exit"] == 0
          and result["run_b_killed"]["killed"] and lc.get("ok", False)
          # A bf16 merged model (GPU runs) carries bf16 rounding of W + BA: a looser bound.
          and lc["max_abs_logit_diff"] <= (1e-3 if lc["merged_dtype"] == "torch.float32" else 5e-2)
          * max(1.0, lc["logit_scale"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
