#!/usr/bin/env python
"""Our GRPO against TRL's GRPOTrainer on CPU: same tiny model, prompts, reward and shape.

Throughput: each round runs both for `--steps` optimizer steps in fresh processes (ours
through `python -m uff_port.training`, TRL's trainer in a child process), alternating
which goes first; reported are the medians over rounds (with min and max) of whole steps/s
(wall time from the end of step 1 to the end of the last step, so start-up and the first
step's warm-up count on neither side) and generation tokens/s (ours from the `rollout`
events; TRL's: completion tokens over the time spent in `generate`), and the medians of
the per-round ratios (ours / TRL). Shape: `configs/rl-tiny.yaml`
(4 prompts x G 8, 8 new tokens, LoRA r 8 on the attention and MLP projections, reward `^\\s`).

Kill-and-resume drift, the same experiment on both, for each `--drift-iterations` value
(updates per generation batch: ours `rl.iterations`, TRL's `num_iterations`): an
uninterrupted run of `--drift-steps` steps with a checkpoint every `--kill-after` steps;
a second run SIGKILLed by this script as soon as its first checkpoint is on disk; then a
resume from that checkpoint (ours: the same command; TRL: `resume_from_checkpoint`).
Reported: the step the resumed process starts at and the absolute difference of every
later step's reward (the mean reward of the batch that step trained on) from the
uninterrupted run's, max and mean.

    pip install -e '.[bench]'   # trl, the baseline (not needed by the tests)
    python scripts/bench_rl.py --rounds 3 --steps 10 --drift-steps 6 --kill-after 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
# TRL refuses LoRA on lm_head (it computes log-probabilities from lm_head.weight directly),
# so both sides adapt the projections only.
PROJ: Final = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_TRL_CHILD: Final = r"""
import json, re, sys, time
import torch
import transformers.generation.utils as gen_utils
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from uff_port.core.config import load_config
from uff_port.training.model import load_model, load_tokenizer, pick_precision
from uff_port.training.rl import load_prompts

spec = json.loads(sys.argv[1])
steps, out, iterations = spec["steps"], spec["out"], spec["iterations"]
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.set_num_threads(1)
cfg = load_config("rl-tiny", {"lora.enabled": False, "stage": "sft", "rl": {}})
tok = load_tokenizer(cfg)
model = load_model(cfg, torch.device("cpu"), pick_precision(cfg, torch.device("cpu")))
r = load_config("rl-tiny").rl
prompts = [tok.decode(tok(t.prompt)["input_ids"][-r.max_prompt_tokens:], skip_special_tokens=True)
           for t in load_prompts(load_config("rl-tiny"))]
ds = Dataset.from_list([{"prompt": p} for p in prompts] * 50)
last_rewards, gen_seconds = [[]], [0.0]

_generate = gen_utils.GenerationMixin.generate
def timed_generate(self, *a, **kw):  # TRL times generation only for wandb and friends
    t = time.perf_counter()
    try:
        return _generate(self, *a, **kw)
    finally:
        gen_seconds[0] += time.perf_counter() - t
gen_utils.GenerationMixin.generate = timed_generate

def starts_with_space(completions, **kw):
    last_rewards[0] = [1.0 if re.match(r"\s", c) else 0.0 for c in completions]
    return last_rewards[0]

class Trainer(GRPOTrainer):
    # The reward of the rows each step trains on: carried through TRL's shuffle and split
    # of the generation batch as one more per-row column, read off before the loss.
    step_reward = None
    def _generate_and_score_completions(self, inputs):
        res = super()._generate_and_score_completions(inputs)
        res["bench_reward"] = torch.tensor(last_rewards[0], dtype=torch.float64)
        return res
    def _prepare_inputs(self, batch):
        got = super()._prepare_inputs(batch)
        if "bench_reward" in got:
            self.step_reward = float(got["bench_reward"].mean())
            got = {k: v for k, v in got.items() if k != "bench_reward"}
        return got

log = open(out + "/steps.jsonl", "a")
times = []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter())
        log.write(json.dumps({"step": state.global_step, "reward": trainer.step_reward}) + "\n")
        log.flush()

save = {"save_strategy": "steps", "save_steps": spec["save_steps"]} if spec.get("save_steps") else {"save_strategy": "no"}
args = GRPOConfig(output_dir=out, per_device_train_batch_size=r.prompts_per_step * r.num_generations,
                  num_generations=r.num_generations, max_completion_length=r.max_new_tokens,
                  learning_rate=0.02, lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
                  logging_steps=1, report_to=[], use_cpu=True, seed=1234, temperature=1.0, beta=0.0,
                  num_iterations=iterations, dataloader_num_workers=0, disable_tqdm=True, **save)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ,
                  task_type="CAUSAL_LM")
trainer = Trainer(model=model, reward_funcs=starts_with_space, args=args, train_dataset=ds,
                  processing_class=tok, peft_config=lora, callbacks=[Clock()])
t0 = time.perf_counter()
trainer.train(resume_from_checkpoint=spec.get("resume"))
wall = time.perf_counter() - t0
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
rows = r.prompts_per_step * r.num_generations
json.dump({"seconds": wall, "steps": steps, "gen_tokens": sum(lengths) * rows, "gen_seconds": gen_seconds[0],
           "step_ends": times},
          open(out + "/trl.json", "w"))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def _ours_cmd(run: Path, steps: int, extra: list[str]) -> list[str]:
    sets = [f"training.max_steps={steps}", "training.progress_every_seconds=0", "output.save_final=false", f"lora.target_modules={PROJ}", *extra]
    return [sys.executable, "-m", "uff_port.training", "--run-dir", str(run), "--config", "rl-tiny",
            *[x for s in sets for x in ("--set", s)]]


def _events(run: Path) -> list[dict[str, Any]]:
    from torture_resume import read_events  # tolerant of a line torn by SIGKILL

    return read_events(run)


def ours(steps: int, work: Path) -> dict[str, Any]:
    run = work / "ours"
    t0 = time.perf_counter()
    subprocess.run(_ours_cmd(run, steps, ["checkpoint.every_steps=null"]), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    events = _events(run)
    roll = [e for e in events if e.get("event") == "rollout"]
    prog = [e for e in events if e.get("event") == "progress"]
    gen_tok = sum(e["completion_length"] * e["completions"] for e in roll)
    gen_s = sum(e["completion_length"] * e["completions"] / e["gen_tokens_per_s"] for e in roll)
    ends = [e["ts"] for e in prog]  # one per step (progress_every_seconds=0)
    return {"wall": wall, "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "gen_tokens_per_s": gen_tok / gen_s}


def _trl_proc(spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _TRL_CHILD, json.dumps(spec)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def trl(steps: int, work: Path) -> dict[str, Any]:
    out = work / "trl"
    out.mkdir()
    t0 = time.perf_counter()
    rc = _trl_proc({"steps": steps, "out": str(out), "iterations": 1}).wait()
    if rc != 0:
        raise RuntimeError(f"TRL's run exited {rc}")
    wall = time.perf_counter() - t0
    res = json.loads((out / "trl.json").read_text())
    ends = res["step_ends"]
    return {"wall": wall, "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]),
            "gen_tokens_per_s": res["gen_tokens"] / max(res["gen_seconds"], 1e-9)}


# ---- kill-and-resume drift ----------------------------------------------------------


def _kill_when(proc: subprocess.Popen[bytes], ready: Any, what: str) -> bool:
    """SIGKILL `proc`'s process group as soon as `ready()`; False when it ended first."""
    while proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    raise RuntimeError(f"{what}: the run ended (exit {proc.returncode}) before its checkpoint was seen")


def _ours_rewards(run: Path) -> tuple[dict[int, float], list[int]]:
    """step -> reward (the last value written wins) and the steps in the order written."""
    prog = [e for e in _events(run) if e.get("event") == "progress" and e.get("reward") is not None]
    return {int(e["step"]): float(e["reward"]) for e in prog}, [int(e["step"]) for e in prog]


def ours_drift(steps: int, kill_after: int, iterations: int, work: Path) -> dict[str, Any]:
    extra = [f"checkpoint.every_steps={kill_after}", f"rl.iterations={iterations}"]
    ref_run, run = work / "ours-ref", work / "ours-kill"
    subprocess.run(_ours_cmd(ref_run, steps, extra), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_ours_cmd(run, steps, extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(proc, lambda: any(e.get("event") == "checkpoint" for e in _events(run)), "ours")
    killed_at = max(_ours_rewards(run)[1], default=0)
    before = len(_ours_rewards(run)[1])
    subprocess.run(_ours_cmd(run, steps, extra), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed, order = _ours_rewards(run)
    return _drift(_ours_rewards(ref_run)[0], resumed, order[before] if len(order) > before else None,
                  kill_after, killed_at, steps)


def _trl_rewards(out: Path) -> list[tuple[int, float]]:
    path = out / "steps.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
    return [(int(r["step"]), float(r["reward"])) for r in rows]


def _complete(path: Path) -> bool:
    """TRL's checkpoint is complete once trainer_state.json (written last, not atomically) parses."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def trl_drift(steps: int, kill_after: int, iterations: int, work: Path) -> dict[str, Any]:
    ref, out = work / "trl-ref", work / "trl-kill"
    ref.mkdir()
    out.mkdir()
    spec = {"steps": steps, "iterations": iterations, "save_steps": kill_after}
    if _trl_proc({**spec, "out": str(ref)}).wait() != 0:
        raise RuntimeError("TRL's uninterrupted run failed")
    ckpt = out / f"checkpoint-{kill_after}"
    proc = _trl_proc({**spec, "out": str(out)})
    _kill_when(proc, lambda: _complete(ckpt / "trainer_state.json"), "TRL")
    killed_at = max((s for s, _ in _trl_rewards(out)), default=0)
    before = len(_trl_rewards(out))
    if _trl_proc({**spec, "out": str(out), "resume": str(ckpt)}).wait() != 0:
        raise RuntimeError("TRL's resumed run failed")
    rows = _trl_rewards(out)
    return _drift(dict(_trl_rewards(ref)), dict(rows), rows[before][0] if len(rows) > before else None,
                  kill_after, killed_at, steps)


def _drift(ref: dict[int, float], resumed: dict[int, float], first: int | None, ckpt: int, killed_at: int,
           steps: int) -> dict[str, Any]:
    after = [s for s in range(ckpt + 1, steps + 1)]
    missing = [s for s in after if s not in resumed or s not in ref]
    diffs = [abs(resumed[s] - ref[s]) for s in after if s not in missing]
    return {"checkpoint": ckpt, "killed_after_step": killed_at, "resumed_at": first,
            "right_step": first == ckpt + 1, "missing_steps": missing,
            "max_abs_drift": max(diffs) if diffs else None,
            "mean_abs_drift": statistics.fmean(diffs) if diffs else None,
            "steps_differing": sum(d != 0 for d in diffs), "steps_compared": len(diffs)}


# ---- report ------------------------------------------------------------------------------


def _fmt(m: dict[str, float], digits: int = 2) -> str:
    return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}-{m['max']:.{digits}f})"


def render(report: dict[str, Any]) -> str:
    o, t = report["ours"], report["trl"]
    lines = [
        f"`{report['command']}` (trl {report['trl_version']}, torch {report['torch_version']} CPU, one thread each,"
        f" {report['date']}, load average {report['load']:.1f} at the start).",
        "",
        f"Throughput, {report['rounds']} interleaved rounds of {report['steps']} steps (rl-tiny's shape, one iteration"
        " per batch), median (min-max) over rounds; ratios are medians of the per-round ratios:",
        "",
        "| | ours | TRL | ratio ours / TRL |",
        "|---|---|---|---|",
        f"| whole steps/s (generation, scoring, update, logging: end of step 1 to end of the last) | {_fmt(o['steps_per_s'])} | {_fmt(t['steps_per_s'])} |"
        f" **{report['ratio_steps_per_s']:.2f}** |",
        f"| generation tokens/s | {_fmt(o['gen_tokens_per_s'], 0)} | {_fmt(t['gen_tokens_per_s'], 0)} |"
        f" **{report['ratio_gen_tokens_per_s']:.2f}** |",
        "",
    ]
    names = {"ratio_steps_per_s": "whole steps/s", "ratio_gen_tokens_per_s": "generation tokens/s"}
    slower = [f"{names[k]} (ratio {report[k]:.2f})" for k in names if report[k] < 1.0]
    lines.append("Ours is **not** faster in " + " nor in ".join(slower) + " in this invocation." if slower else
                 "Ours is faster in both (ratios >= 1.0) in this invocation.")
    lines += [
        "",
        f"Kill-and-resume drift ({report['drift_steps']} steps, checkpoint every {report['kill_after']}; SIGKILL as soon"
        " as the first checkpoint is on disk, then resume from it; per step, |reward - uninterrupted run's reward|"
        " over the steps after the checkpoint):",
        "",
        "| trainer | iterations per batch | killed after step | resumed at step (right?) | steps differing |"
        " max abs drift | mean abs drift |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in (("ours", report["drift"]["ours"]), ("TRL", report["drift"]["trl"])):
        for it, d in rows.items():
            mx = "n/a" if d["max_abs_drift"] is None else f"{d['max_abs_drift']:.4f}"
            mn = "n/a" if d["mean_abs_drift"] is None else f"{d['mean_abs_drift']:.4f}"
            lines.append(f"| {name} | {it} | {d['killed_after_step']} | {d['resumed_at']}"
                         f" ({'yes' if d['right_step'] else 'no'}) | {d['steps_differing']}/{d['steps_compared']} |"
                         f" {mx} | {mn} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--drift-steps", type=int, default=6)
    p.add_argument("--kill-after", type=int, default=3, help="checkpoint every N steps; the kill follows the first")
    p.add_argument("--drift-iterations", type=int, nargs="*", default=[1, 2])
    p.add_argument("--out", type=Path, help="write the figures into this doc's bench_rl section")
    a = p.parse_args(argv)
    if not 0 < a.kill_after < a.drift_steps:
        p.error("--kill-after must be between 1 and --drift-steps - 1")
    sys.path.insert(0, str(ROOT / "scripts"))
    load = os.getloadavg()[0]
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for i in range(a.rounds):
        order = [("ours", ours), ("trl", trl)] if i % 2 == 0 else [("trl", trl), ("ours", ours)]
        for name, fn in order:
            with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
                rows[name].append(fn(a.steps, Path(tmp)))
    drift: dict[str, dict[int, dict[str, Any]]] = {"ours": {}, "trl": {}}
    for it in a.drift_iterations:
        for name, dfn in (("ours", ours_drift), ("trl", trl_drift)):
            with tempfile.TemporaryDirectory(prefix="bench-rl-drift-") as tmp:
                drift[name][it] = dfn(a.drift_steps, a.kill_after, it, Path(tmp))

    def med(name: str, key: str) -> dict[str, float]:
        v = [r[key] for r in rows[name]]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    def ratio(key: str) -> float:
        return statistics.median(o[key] / t[key] for o, t in zip(rows["ours"], rows["trl"], strict=True))

    import torch
    import trl as trl_pkg

    report = {
        "command": " ".join(["python", "scripts/bench_rl.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "load": load,
        "trl_version": trl_pkg.__version__, "torch_version": torch.__version__.split("+")[0],
        "steps": a.steps, "rounds": a.rounds, "drift_steps": a.drift_steps, "kill_after": a.kill_after,
        "ours": {"steps_per_s": med("ours", "steps_per_s"), "gen_tokens_per_s": med("ours", "gen_tokens_per_s")},
        "trl": {"steps_per_s": med("trl", "steps_per_s"), "gen_tokens_per_s": med("trl", "gen_tokens_per_s")},
        "ratio_steps_per_s": ratio("steps_per_s"), "ratio_gen_tokens_per_s": ratio("gen_tokens_per_s"),
        "drift": drift,
    }
    print(json.dumps(report, indent=2))
    text = render(report)
    print(text)
    if a.out:  # only this script's marked section of the doc (scripts/doc_section.py)
        from doc_section import replace_section

        replace_section(a.out, "bench_rl", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
