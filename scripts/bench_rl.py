#!/usr/bin/env python
"""Our GRPO against TRL's GRPOTrainer on CPU: same tiny model, prompts, reward and shape.

Each round runs both for `--steps` optimizer steps in fresh processes (ours through
`python -m uff_port.training`, TRL in-process in a child), alternating which goes first;
reported are the medians over rounds (with min and max) of update steps/s and generation
tokens/s, and their ratios (ours / TRL). Shape: `configs/rl-tiny.yaml` (4 prompts x G 8,
8 new tokens, LoRA r 8 on the attention and MLP projections, reward `^\\s`).

    pip install -e '.[bench]'   # trl, the baseline (not needed by the tests)
    python scripts/bench_rl.py --rounds 3 --steps 10

Not measured here (yet): kill-and-resume reward drift of TRL (its checkpoints keep no
sampler state or rollout; see docs/rl.md for ours, which is exact).
"""

from __future__ import annotations

import argparse
import json
import os
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
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from uff_port.core.config import load_config
from uff_port.training.model import load_model, load_tokenizer, pick_precision
from uff_port.training.rl import load_prompts

steps, out = int(sys.argv[1]), sys.argv[2]
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.set_num_threads(1)
cfg = load_config("rl-tiny", {"lora.enabled": False, "stage": "sft", "rl": {}})
tok = load_tokenizer(cfg)
model = load_model(cfg, torch.device("cpu"), pick_precision(cfg, torch.device("cpu")))
r = load_config("rl-tiny").rl
prompts = [tok.decode(tok(t.prompt)["input_ids"][-r.max_prompt_tokens:], skip_special_tokens=True)
           for t in load_prompts(load_config("rl-tiny"))]
ds = Dataset.from_list([{"prompt": p} for p in prompts] * 50)
gen_tokens = [0]

def starts_with_space(completions, **kw):
    gen_tokens[0] += sum(len(tok(c)["input_ids"]) for c in completions)
    return [1.0 if re.match(r"\s", c) else 0.0 for c in completions]

times = []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter())

args = GRPOConfig(output_dir=out, per_device_train_batch_size=r.prompts_per_step * r.num_generations,
                  num_generations=r.num_generations, max_completion_length=r.max_new_tokens,
                  learning_rate=0.02, lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
                  logging_steps=1, report_to=[], use_cpu=True, seed=1234, temperature=1.0, beta=0.0,
                  save_strategy="no", num_iterations=1, dataloader_num_workers=0, disable_tqdm=True)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ,
                  task_type="CAUSAL_LM")
trainer = GRPOTrainer(model=model, reward_funcs=starts_with_space, args=args, train_dataset=ds,
                      processing_class=tok, peft_config=lora, callbacks=[Clock()])
t0 = time.perf_counter()
trainer.train()
wall = time.perf_counter() - t0
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
json.dump({"seconds": wall, "steps": steps, "gen_tokens": gen_tokens[0], "rewards": rewards}, open(out + "/trl.json", "w"))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def ours(steps: int, work: Path) -> dict[str, Any]:
    run = work / "ours"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "uff_port.training", "--run-dir", str(run), "--config", "rl-tiny",
                    "--set", f"training.max_steps={steps}", "--set", "checkpoint.every_steps=null",
                    "--set", "output.save_final=false", "--set", f"lora.target_modules={PROJ}"],
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    roll = [e for e in events if e.get("event") == "rollout"]
    prog = [e for e in events if e.get("event") == "progress"]
    gen_tok = sum(e["completion_length"] * e["completions"] for e in roll)
    gen_s = sum(e["completion_length"] * e["completions"] / e["gen_tokens_per_s"] for e in roll)
    step_s = sum(e["step_seconds"] for e in prog)
    return {"wall": wall, "steps_per_s": steps / step_s, "gen_tokens_per_s": gen_tok / gen_s,
            "rewards": [e["reward"] for e in roll]}


def trl(steps: int, work: Path) -> dict[str, Any]:
    out = work / "trl"
    out.mkdir()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _TRL_CHILD, str(steps), str(out)], env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    res = json.loads((out / "trl.json").read_text())
    # TRL's train() time covers generation, scoring and the update of every step.
    return {"wall": wall, "steps_per_s": steps / res["seconds"], "gen_tokens_per_s": None,
            "gen_tokens": res["gen_tokens"], "train_seconds": res["seconds"], "rewards": res["rewards"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for i in range(a.rounds):
        order = [("ours", ours), ("trl", trl)] if i % 2 == 0 else [("trl", trl), ("ours", ours)]
        for name, fn in order:
            with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
                rows[name].append(fn(a.steps, Path(tmp)))

    def med(name: str, key: str) -> dict[str, float]:
        v = [r[key] for r in rows[name]]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    # Whole-step throughput is what compares: generation + scoring + update per step, both.
    report = {
        "command": " ".join(["python", *sys.argv]),
        "steps": a.steps, "rounds": a.rounds,
        "ours": {"steps_per_s_train_loop": med("ours", "steps_per_s"), "gen_tokens_per_s": med("ours", "gen_tokens_per_s"),
                 "rewards_last_round": rows["ours"][-1]["rewards"]},
        "trl": {"steps_per_s_train_loop": med("trl", "steps_per_s"),
                "rewards_last_round": rows["trl"][-1]["rewards"]},
        "ratio_steps_per_s": statistics.median(o["steps_per_s"] / t["steps_per_s"]
                                               for o, t in zip(rows["ours"], rows["trl"], strict=True)),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
