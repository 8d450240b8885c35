"""Peak memory and tokens/s of one LoRA training step at DeepSeek-Coder-1.3B width.

    flock /tmp/uff-bigmem.lock python scripts/bench_memory.py [--layers 1] [--seqs 1024,2048]
        [--micro 1,4] [--rounds 3] [--threads 1] [--json out.json]
    python scripts/bench_memory.py --device cuda --layers 24      # on a GPU: bf16 autocast, all layers
                                                                  # (also: bench_gpu_training.py --memory)

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
an unprofiled warm-up (the AdamW state exists); that profiled step is also each
variant's warm-up for the timing. It is deterministic, so one
round suffices. The loss part alone is profiled the same way: a leaf hidden
state [batch, seq, 2048] through lm_head and the loss to its gradient, peak
minus the bytes live before.

On CUDA the base weights are bf16 under bf16 autocast (the trainer's GPU
precision), the adapters fp32, and peak memory is `torch.cuda.max_memory_allocated`
over the step (the loss part: over it, minus what was allocated before).

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


def build(layers: int, device: str = "cpu") -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", use_cache=False, **DIMS)
    model = LlamaForCausalLM(cfg)
    if device == "cuda":
        model = model.to(device="cuda", dtype=torch.bfloat16)  # the trainer loads the base in bf16
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():  # adapters in fp32, as the trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def autocast_of(device: str) -> torch.dtype | None:
    return torch.bfloat16 if device == "cuda" else None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def packed_batch(micro: int, seq: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
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
    return {"input_ids": torch.tensor(ids, device=device), "position_ids": torch.tensor(pos, device=device),
            "labels": torch.tensor(labels, device=device)}


def step_fn(model: Any, opt: torch.optim.Optimizer, variant: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    n = float((batch["labels"][:, 1:] != -100).sum())
    device = batch["labels"].device.type
    ac = autocast_of(device)

    def step() -> None:
        b = dict(batch)
        if variant == "hf":
            with torch.autocast(device, dtype=ac or torch.float32, enabled=ac is not None):
                loss = model(**b, use_cache=False).loss
        elif variant == "full":
            loss = full_loss_sum(model, b, ac) / n
        else:
            loss = chunked_loss_sum(model, b, ac) / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profiled_peak(fn: Callable[[], None], device: str = "cpu") -> tuple[int, int]:
    """(peak live tensor bytes, bytes live at the start) over one call, from the profiler timeline
    (CPU) or the caching allocator's statistics (CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()), int(start)
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
    device = labels.device.type
    ac = autocast_of(device)
    hidden = torch.randn(micro, seq, DIMS["hidden_size"], generator=torch.Generator().manual_seed(3))
    hidden = hidden.to(device=device, dtype=ac or torch.float32).requires_grad_()

    def run() -> None:
        with torch.autocast(device, dtype=ac or torch.float32, enabled=ac is not None):
            if variant == "hf":
                logits = head(hidden)
                loss = base.loss_function(logits=logits, labels=labels, vocab_size=DIMS["vocab_size"])
            elif variant == "full":
                logits = head(hidden)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                         labels[:, 1:].flatten(), ignore_index=-100,
                                                         reduction="sum") / n
            else:
                target = torch.full_like(labels, -100)
                target[:, :-1] = labels[:, 1:]
                loss = chunked_ce_sum(head, hidden.flatten(0, 1), target.flatten(), ac) / n
        loss.backward()
        hidden.grad = None

    return run


def ratio_stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def loss_part_only(model: Any, micro: int, seq: int, device: str = "cpu") -> dict[str, Any]:
    """The loss part's peak per variant, nothing else (`--loss-only`: minutes less a shape)."""
    batch = packed_batch(micro, seq, seed=micro * 10007 + seq, device=device)
    lossp = {}
    for v in VARIANTS:
        hi, start = profiled_peak(loss_part(model, batch, v), device)
        lossp[v] = hi - start
    return {"micro": micro, "seq": seq, "tokens": micro * seq, "loss_part_bytes": lossp,
            "loss_part_cut_vs_hf": lossp["hf"] / max(lossp["chunked"], 1),
            "loss_part_cut_vs_full": lossp["full"] / max(lossp["chunked"], 1)}


def bench_shape(model: Any, micro: int, seq: int, rounds: int, device: str = "cpu",
                time_it: bool = True) -> dict[str, Any]:
    batch = packed_batch(micro, seq, seed=micro * 10007 + seq, device=device)
    tokens = micro * seq
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = {v: step_fn(model, opt, v, batch) for v in VARIANTS}
    out: dict[str, Any] = {"micro": micro, "seq": seq, "tokens": tokens}
    # Memory: a small warm-up step (creates the AdamW state), then one profiled step per
    # variant; the loss part alone.
    step_fn(model, opt, "chunked", packed_batch(1, 128, seed=1, device=device))()
    peak = {v: profiled_peak(steps[v], device)[0] for v in VARIANTS}
    lossp = {}
    for v in VARIANTS:
        hi, start = profiled_peak(loss_part(model, batch, v), device)
        lossp[v] = hi - start
    out["peak_bytes"], out["loss_part_bytes"] = peak, lossp
    out["peak_chunked_vs_hf"] = peak["chunked"] / peak["hf"]
    out["peak_chunked_vs_full"] = peak["chunked"] / peak["full"]
    out["loss_part_cut_vs_hf"] = lossp["hf"] / max(lossp["chunked"], 1)
    out["loss_part_cut_vs_full"] = lossp["full"] / max(lossp["chunked"], 1)
    if not time_it:
        return out
    # Speed: interleaved rounds (each variant has run once above: warm).
    secs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS)
        random.Random(r).shuffle(order)
        for v in order:
            sync(device)
            t0 = time.perf_counter()
            steps[v]()
            sync(device)
            secs[v].append(time.perf_counter() - t0)
    out["seconds"] = secs
    out["tokens_per_s"] = {v: tokens / statistics.median(secs[v]) for v in VARIANTS}
    out["speed_chunked_vs_hf"] = ratio_stats([h / c for h, c in zip(secs["hf"], secs["chunked"], strict=True)])
    out["speed_chunked_vs_full"] = ratio_stats([f / c for f, c in zip(secs["full"], secs["chunked"], strict=True)])
    return out


def table(results: list[dict[str, Any]], layers: int, device: str = "cpu") -> str:
    gib = 2**30
    where = "bf16 autocast, CUDA (max_memory_allocated)" if device == "cuda" else "fp32, CPU (profiler timeline)"
    lines = [
        f"DeepSeek-Coder-1.3B width (hidden 2048, vocab 32256, intermediate 5504, 16 heads), {layers} decoder "
        f"layer(s), LoRA r16, {where}.",
        "",
        "| micro x seq | loss part hf / full / chunked (GiB) | loss-part cut vs hf | whole-step peak hf / full / "
        "chunked (GiB) | peak chunked/hf | tokens/s hf / full / chunked | speed chunked/hf (median, min..max) | "
        "speed chunked/full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lp, pk = r["loss_part_bytes"], r["peak_bytes"]
        if "tokens_per_s" in r:
            tps, s, f = r["tokens_per_s"], r["speed_chunked_vs_hf"], r["speed_chunked_vs_full"]
            speed = (f"{tps['hf']:.0f} / {tps['full']:.0f} / {tps['chunked']:.0f} | {s['median']:.2f} "
                     f"({s['min']:.2f}..{s['max']:.2f}) | {f['median']:.2f} ({f['min']:.2f}..{f['max']:.2f})")
        else:
            speed = "not timed (--time-max-tokens) | - | -"
        lines.append(
            f"| {r['micro']} x {r['seq']} | {lp['hf'] / gib:.2f} / {lp['full'] / gib:.2f} / {lp['chunked'] / gib:.3f} "
            f"| {r['loss_part_cut_vs_hf']:.1f}x | {pk['hf'] / gib:.2f} / {pk['full'] / gib:.2f} / "
            f"{pk['chunked'] / gib:.2f} | {r['peak_chunked_vs_hf']:.2f} | {speed} |"
        )
    return "\n".join(lines)


def run(layers: int, seqs: list[int], micros: list[int], rounds: int, device: str = "cpu",
        time_max_tokens: int | None = None, json_path: str | None = None,
        loss_only: bool = False) -> list[dict[str, Any]]:
    """Every (micro, seq) shape in one invocation; prints each result as it comes."""
    warnings.simplefilter("ignore")
    model = build(layers, device)
    results = []
    for micro in micros:
        for seq in seqs:
            t0 = time.perf_counter()
            timed = time_max_tokens is None or micro * seq <= time_max_tokens
            r = (loss_part_only(model, micro, seq, device) if loss_only
                 else bench_shape(model, micro, seq, rounds, device, time_it=timed))
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "seconds"}), f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            if json_path:  # after every shape: a long run leaves what it has measured
                with open(json_path, "w") as fh:
                    json.dump({"layers": layers, "rounds": rounds, "device": device, "results": results}, fh, indent=1)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seqs", default="1024,2048")
    ap.add_argument("--micro", default="1,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--loss-only", action="store_true", help="only the loss part's peak memory")
    ap.add_argument("--time-max-tokens", type=int, default=None,
                    help="measure only memory for larger micro x seq (a busy 2-core host: 4 x 2048 takes minutes a step)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    results = run(args.layers, [int(x) for x in args.seqs.split(",")], [int(x) for x in args.micro.split(",")],
                  args.rounds, args.device, args.time_max_tokens, args.json, args.loss_only)
    if args.loss_only:
        for r in results:
            lp = r["loss_part_bytes"]
            print(f"{r['micro']} x {r['seq']}: loss part hf / full / chunked "
                  f"{lp['hf'] / 2**30:.2f} / {lp['full'] / 2**30:.2f} / {lp['chunked'] / 2**30:.3f} GiB, "
                  f"cut vs hf {r['loss_part_cut_vs_hf']:.1f}x")
        return
    print(table(results, args.layers, args.device))


if __name__ == "__main__":
    main()
