"""Peak memory and tokens/s of one LoRA training step at DeepSeek-Coder-1.3B width.

    flock /tmp/uff-bigmem.lock python scripts/bench_memory.py [--layers 1] [--seqs 1024,2048]
        [--micro 1,4] [--rounds 3] [--threads 1] [--json out.json]

The model is transformers' LlamaConfig with DeepSeek-Coder-1.3B's real
dimensions (hidden 2048, intermediate 5504, 16 heads, vocab 32256) and random
weights, LoRA r=16 on all seven projections (the trainer's defaults), fp32 on
CPU. Only the number of decoder layers is reduced (`--layers`, default 1): the
loss depends on hidden size and vocabulary only, and a 24-layer step at 4 x 2048
takes minutes on a CPU core. The layers scale the whole-step denominator, so
the whole-step ratio at 24 layers is smaller; docs/memory.md gives the
planner's account of it.

Each batch is packed like the trainer's (samples of 128-767 tokens, position
ids restarting at 0, each sample's first label -100, no attention mask) and the
same tensors go to every variant:

* `hf`: a plain transformers `Trainer` step: `model(**batch, labels=...).loss.backward()`;
* `full`: today's loss (`training.loss: full`): logits, fp32 cross-entropy sum / tokens;
* `chunked`: the new default (`training.loss: chunked`, uff_port/training/loss.py).

Every step is forward, backward, AdamW on the adapters and zero_grad.

Peak memory: PyTorch's own accounting of CPU tensors, the memory profiler's
timeline (`torch.profiler.profile(profile_memory=True)`, the maximum over time of
all live tensor bytes, parameters included), one profiled step per variant after
an unprofiled warm-up (the AdamW state exists). It is deterministic, so one
round suffices. The loss part alone is profiled the same way: a leaf hidden
state [batch, seq, 2048] through lm_head and the loss to its gradient, peak
minus the bytes live before.

Tokens/s: wall time of a step without the profiler, `--rounds` rounds, the
variants in a different order each round (interleaved); each ratio is the
median over rounds of the per-round ratio, with its min..max.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from uff_port.training.loss import chunked_ce_sum, chunked_loss_sum, full_loss_sum

VARIANTS = ("hf", "full", "chunked")
DIMS = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 32256, "max_position_embeddings": 16384, "rope_theta": 100000.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(layers: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", use_cache=False, **DIMS)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return model.train()


def packed_batch(micro: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    ids, pos, labels = [], [], []
    for _ in range(micro):
        row_pos: list[int] = []
        row_lab: list[int] = []
        row_ids = [rng.randrange(DIMS["vocab_size"]) for _ in range(seq)]
        while len(row_pos) < seq:
            n = min(rng.randrange(128, 768), seq - len(row_pos))
            row_pos += list(range(n))
            row_lab += [-100] + row_ids[len(row_lab) + 1 : len(row_lab) + n]
        ids.append(row_ids)
        pos.append(row_pos)
        labels.append(row_lab)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels)}


def step_fn(model: Any, opt: torch.optim.Optimizer, variant: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    n = float((batch["labels"][:, 1:] != -100).sum())

    def step() -> None:
        b = dict(batch)
        if variant == "hf":
            loss = model(**b, use_cache=False).loss
        elif variant == "full":
            loss = full_loss_sum(model, b, None) / n
        else:
            loss = chunked_loss_sum(model, b, None) / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profiled_peak(fn: Callable[[], None]) -> tuple[int, int]:
    """(peak live tensor bytes, bytes live at the start) over one call, from the profiler timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return int(max(totals)), int(totals[0]) if totals else 0


def loss_part(model: Any, batch: dict[str, torch.Tensor], variant: str) -> Callable[[], None]:
    """lm_head + loss + backward to the hidden state, alone (HF's loss function for `hf`)."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    micro, seq = batch["input_ids"].shape
    labels = batch["labels"]
    n = float((labels[:, 1:] != -100).sum())
    hidden = torch.randn(micro, seq, DIMS["hidden_size"], generator=torch.Generator().manual_seed(3)).requires_grad_()

    def run() -> None:
        if variant == "hf":
            logits = head(hidden)
            loss = base.loss_function(logits=logits, labels=labels, vocab_size=DIMS["vocab_size"])
        elif variant == "full":
            logits = head(hidden)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum") / n
        else:
            target = torch.full_like(labels, -100)
            target[:, :-1] = labels[:, 1:]
            loss = chunked_ce_sum(head, hidden.flatten(0, 1), target.flatten(), None) / n
        loss.backward()
        hidden.grad = None

    return run


def ratio_stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_shape(model: Any, micro: int, seq: int, rounds: int) -> dict[str, Any]:
    batch = packed_batch(micro, seq, seed=micro * 10007 + seq)
    tokens = micro * seq
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = {v: step_fn(model, opt, v, batch) for v in VARIANTS}
    out: dict[str, Any] = {"micro": micro, "seq": seq, "tokens": tokens}
    # Memory: one warm-up (AdamW state), then one profiled step per variant; the loss part alone.
    steps["chunked"]()
    peak = {v: profiled_peak(steps[v])[0] for v in VARIANTS}
    lossp = {}
    for v in VARIANTS:
        hi, start = profiled_peak(loss_part(model, batch, v))
        lossp[v] = hi - start
    out["peak_bytes"], out["loss_part_bytes"] = peak, lossp
    # Speed: interleaved rounds, a warm-up each first.
    for v in VARIANTS:
        steps[v]()
    secs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS)
        random.Random(r).shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            steps[v]()
            secs[v].append(time.perf_counter() - t0)
    out["seconds"] = secs
    out["tokens_per_s"] = {v: tokens / statistics.median(secs[v]) for v in VARIANTS}
    out["speed_chunked_vs_hf"] = ratio_stats([h / c for h, c in zip(secs["hf"], secs["chunked"], strict=True)])
    out["speed_chunked_vs_full"] = ratio_stats([f / c for f, c in zip(secs["full"], secs["chunked"], strict=True)])
    out["peak_chunked_vs_hf"] = peak["chunked"] / peak["hf"]
    out["peak_chunked_vs_full"] = peak["chunked"] / peak["full"]
    out["loss_part_cut_vs_hf"] = lossp["hf"] / max(lossp["chunked"], 1)
    out["loss_part_cut_vs_full"] = lossp["full"] / max(lossp["chunked"], 1)
    return out


def table(results: list[dict[str, Any]], layers: int) -> str:
    gib = 2**30
    lines = [
        f"DeepSeek-Coder-1.3B width (hidden 2048, vocab 32256, intermediate 5504, 16 heads), {layers} decoder "
        "layer(s), LoRA r16, fp32, CPU.",
        "",
        "| micro x seq | loss part hf / full / chunked (GiB) | loss-part cut vs hf | whole-step peak hf / full / "
        "chunked (GiB) | peak chunked/hf | tokens/s hf / full / chunked | speed chunked/hf (median, min..max) | "
        "speed chunked/full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lp, pk, tps = r["loss_part_bytes"], r["peak_bytes"], r["tokens_per_s"]
        s, f = r["speed_chunked_vs_hf"], r["speed_chunked_vs_full"]
        lines.append(
            f"| {r['micro']} x {r['seq']} | {lp['hf'] / gib:.2f} / {lp['full'] / gib:.2f} / {lp['chunked'] / gib:.3f} "
            f"| {r['loss_part_cut_vs_hf']:.1f}x | {pk['hf'] / gib:.2f} / {pk['full'] / gib:.2f} / "
            f"{pk['chunked'] / gib:.2f} | {r['peak_chunked_vs_hf']:.2f} | {tps['hf']:.0f} / {tps['full']:.0f} / "
            f"{tps['chunked']:.0f} | {s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f}) | "
            f"{f['median']:.2f} ({f['min']:.2f}..{f['max']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seqs", default="1024,2048")
    ap.add_argument("--micro", default="1,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = build(args.layers)
    results = []
    for micro in (int(x) for x in args.micro.split(",")):
        for seq in (int(x) for x in args.seqs.split(",")):
            t0 = time.perf_counter()
            r = bench_shape(model, micro, seq, args.rounds)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "seconds"}), f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"layers": args.layers, "threads": args.threads, "rounds": args.rounds, "results": results},
                      fh, indent=1)
    print(table(results, args.layers))


if __name__ == "__main__":
    main()
