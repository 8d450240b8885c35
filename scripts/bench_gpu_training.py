"""GPU training figures at real DeepSeek-Coder dimensions (random weights), with our trainer.

    python scripts/bench_gpu_training.py                  # 1.3B LoRA, 6.7B QLoRA (16 GiB cap), 1.3B baseline ratio
    python scripts/bench_gpu_training.py --only 6.7b-qlora --seq-len 2048 --steps 8
    python scripts/bench_gpu_training.py --memory         # the memory cases below, nothing else

`--memory` (docs/memory.md, docs/benchmarks.md "Memory per gigabyte"): the 1.3B
preset through our trainer with `training.loss: full` against the chunked default
at micro-batch 1 and 4 (each pair in one invocation, alternating), then
scripts/bench_memory.py's step comparison (HF `model(**batch, labels=...)` vs the
full vs the chunked loss) on the 24-layer 1.3B in bf16 at 1/4 x 1024/2048, with
`torch.cuda.max_memory_allocated`. The memory cases also run one at a time
through `--only` (e.g. `--only 1.3b-lora-mb4-full-loss`).

For each case: tokens/s (after warm-up steps), torch.cuda.max_memory_reserved,
NVML memory used, and MFU (6 * params * tokens/s over the device's dense bf16
peak; LoRA skips weight gradients, so this slightly overstates the work done,
and gradient checkpointing's recompute is not counted). The 6.7B QLoRA case
runs under `torch.cuda.set_per_process_memory_fraction` for 16 GiB: it must
fit a 16 GB card at sequence length 2048. The ratio line compares the 1.3B
preset against the same run without packing, in the same invocation.

Weights are random (no download): the model is built from the real config
(uff_port/training/real_arch.py, once under $UFF_PORT_CACHE), and loaded by
the trainer through the same from_pretrained path as a real checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# deepseek-ai/deepseek-coder-{1.3b,6.7b}-base config.json dimensions.
ARCH: dict[str, dict[str, Any]] = {
    "1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32256, max_position_embeddings=16384, rope_theta=100000.0),
    "6.7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32256, max_position_embeddings=16384, rope_theta=100000.0),
}  # fmt: skip
CASES: dict[str, dict[str, Any]] = {
    "1.3b-lora": {"arch": "1.3b", "preset": "deepseek-coder-1.3b-lora-16gb.yaml", "cap_gib": None},
    "6.7b-qlora": {"arch": "6.7b", "preset": "deepseek-coder-6.7b-qlora-16gb.yaml", "cap_gib": 16.0},
    # bf16 LoRA through DeepSpeed ZeRO-3 with parameters and optimizer on the host, one GPU
    # capped at 16 GiB: the DeepSpeed path of the 2 x 16 GB preset (~40 GB host RAM).
    "6.7b-zero3-offload": {"arch": "6.7b", "preset": "deepseek-coder-6.7b-2x16gb.yaml", "cap_gib": 16.0,
                           "overrides": {"distributed.nproc": 1, "distributed.backend": "deepspeed",
                                         "distributed.deepspeed_config": "configs/deepspeed/zero3-offload.json",
                                         "quantization.mode": "none"}},
}
# Memory cases (--memory): today's full loss against the chunked default, same preset.
MEMORY_CASES: dict[str, dict[str, Any]] = {
    f"1.3b-lora-mb{mb}-{loss}-loss": {"arch": "1.3b", "preset": "deepseek-coder-1.3b-lora-16gb.yaml", "cap_gib": None,
                                      "overrides": {"training.loss": loss, "training.micro_batch_size": mb}}
    for mb in (1, 4) for loss in ("full", "chunked")
}
CASES.update(MEMORY_CASES)
DEFAULT_CASES = [c for c in sorted(CASES) if c not in MEMORY_CASES]
# Dense bf16 peak TFLOP/s by device name fragment (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "5060 Ti": 93.0, "4090": 165.0}


def build_random_model(arch: str) -> Path:
    """Real config, random weights, a 32256-entry tokenizer: uff_port/training/real_arch.py, built once."""
    import torch

    from uff_port.training.real_arch import ensure_real_arch

    path = ensure_real_arch(arch, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.cuda.empty_cache()
    return path


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def nvml_used_mib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("LOCAL_RANK", "0")))
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def run_case(name: str, a: argparse.Namespace, packing: bool = True) -> dict[str, Any]:
    import torch

    from uff_port.core.config import load_config
    from uff_port.training.channel import Inbox
    from uff_port.training.reporting import Reporter
    from uff_port.training.trainer import Trainer

    case = CASES[name]
    smoke = a.smoke  # the same code on the tiny model on CPU: checks the script, measures nothing
    if smoke:
        from uff_port.training.builtin import ensure_tiny_llama

        model_dir = ensure_tiny_llama()
    else:
        model_dir = build_random_model(case["arch"])
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        total = torch.cuda.get_device_properties(0).total_memory
        if case["cap_gib"]:
            torch.cuda.set_per_process_memory_fraction(min(1.0, case["cap_gib"] * 2**30 / total))
        else:
            torch.cuda.set_per_process_memory_fraction(1.0)
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    overrides = {
        "model.name_or_path": str(model_dir),
        "model.local_files_only": True,
        "data.seq_len": a.seq_len,
        "data.packing": packing,
        "data.eval_fraction": 0.0,
        "training.max_steps": a.warmup + a.steps,
        "training.device": "cpu" if smoke else "cuda",
        **({"training.precision": "fp32", "training.cpu_threads": 1} if smoke else {}),
        "checkpoint.every_steps": None,
        "eval.every_steps": None,
        "output.save_final": False,
    }
    overrides.update(case.get("overrides", {}))
    if a.grad_accum:
        overrides["training.grad_accum_steps"] = a.grad_accum
    cfg = load_config(ROOT / "configs" / case["preset"], overrides)
    # The planner's estimate of exactly this config on this card (or the cap), before it runs.
    from uff_port.planner.guard import check_config

    cap = 0 if smoke else int(min(total, (case["cap_gib"] or 1e9) * 2**30))
    plan = check_config(cfg, [] if smoke else [{"memory_total": cap}]).estimate or {}
    est_mib = (plan.get("cpu_total") if smoke else plan.get("gpu_reserved") or 0) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), reporter=Reporter(Path(tmp)), inbox=Inbox(), fresh=True)
        tr.setup()
        n_params = sum(p.numel() for p in tr.model.parameters())
        tokens = 0
        t0 = 0.0
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                sync()
                t0 = time.perf_counter()
            seqs = tr.data.take(tr.micro * tr.accum)
            tr._step(seqs, [])  # noqa: SLF001 - the loop body without events
            tr.step += 1
            if i >= a.warmup:
                tokens += sum(sum(1 for t in s.input_ids if t != tr.data.pad_id) for s in seqs)
        sync()
        dt = time.perf_counter() - t0
        nvml = None if smoke else nvml_used_mib()
        reserved = 0.0 if smoke else torch.cuda.max_memory_reserved() / 2**20
        del tr
    if not smoke:
        torch.cuda.empty_cache()
    tps = tokens / dt
    dev = "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)
    peak = None if smoke else peak_tflops(dev, a.peak_tflops)
    # The 4-bit model reports packed parameter counts: use the architecture's count for FLOPs.
    arch_params = n_params if smoke else _arch_params(case["arch"])
    mfu = 6 * arch_params * tps / (peak * 1e12) if peak else None
    return {
        "case": name + ("" if packing else " (no packing)"), "device": dev, "seq_len": a.seq_len,
        "micro_batch": cfg.training.micro_batch_size, "grad_accum": cfg.training.grad_accum_steps,
        "tokens_per_s": tps, "max_memory_reserved_mib": reserved, "nvml_used_mib": nvml,
        "cap_gib": case["cap_gib"], "mfu": mfu, "params": arch_params,
        "planner_estimate_mib": est_mib, "planner_label": plan.get("label"),
        "estimate_over_measured": est_mib / reserved if reserved else None,
    }  # fmt: skip


def _arch_params(arch: str) -> int:
    d = ARCH[arch]
    h, i, n, v = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
    return n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(CASES), action="append", default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4, help="smaller than the presets' to keep the run short")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None, help="put the markdown table in its marked section of this doc")
    ap.add_argument("--smoke", action="store_true",
                    help="run each case's code on the tiny model on CPU (2 steps): a check of this script")
    ap.add_argument("--no-baseline", action="store_true", help="skip the 1.3B run without packing")
    ap.add_argument("--json-out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--memory", action="store_true", help="run the memory cases (chunked vs full loss, vs HF)")
    ap.add_argument("--memory-rounds", type=int, default=3)
    a = ap.parse_args()
    import torch

    if a.smoke:
        a.seq_len, a.steps, a.warmup, a.grad_accum = min(a.seq_len, 128), 2, 1, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (see docs/benchmarks.md)")
    if a.memory:
        memory_main(a)
        return
    rows = [run_case(name, a) for name in (a.only or DEFAULT_CASES)]
    baseline = None
    if (not a.only or "1.3b-lora" in a.only) and not a.no_baseline:
        baseline = run_case("1.3b-lora", a, packing=False)
        rows.append(baseline)
    print(json.dumps(rows, indent=2))
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"Command: `python scripts/bench_gpu_training.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        "| case | device | seq | micro x accum | tokens/s | max_memory_reserved MiB | NVML used MiB | cap GiB | MFU | planner MiB | est/measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['device']} | {r['seq_len']} | {r['micro_batch']} x {r['grad_accum']} | "
            f"{r['tokens_per_s']:.0f} | {r['max_memory_reserved_mib']:.0f} | {r['nvml_used_mib'] or float('nan'):.0f} | "
            f"{r['cap_gib'] or '-'} | {(r['mfu'] or float('nan')) * 100:.1f}% | {r['planner_estimate_mib']:.0f} | "
            f"{r['estimate_over_measured'] or float('nan'):.3f} |"
        )
    if baseline is not None:
        packed = next(r for r in rows if r["case"] == "1.3b-lora")
        lines += ["", f"1.3B packing vs no packing (same invocation): **{packed['tokens_per_s'] / baseline['tokens_per_s']:.2f}x** tokens/s"]
    text = "\n".join(lines)
    print(text)
    if a.out:  # only this script's marked section of the doc (scripts/doc_section.py)
        from doc_section import replace_section

        replace_section(a.out, "bench_gpu_training", text)


def memory_main(a: argparse.Namespace) -> None:
    """Trainer runs, full vs chunked loss (alternating), then bench_memory's step comparison."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_memory

    rows = []
    for mb in (1, 4):
        for loss in ("full", "chunked", "full", "chunked"):  # alternating, twice
            r = run_case(f"1.3b-lora-mb{mb}-{loss}-loss", a)
            rows.append(r)
            print(json.dumps(r), flush=True)
    lines = [
        f"Command: `python scripts/bench_gpu_training.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        "| case | device | seq | micro x accum | tokens/s | max_memory_reserved MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['device']} | {r['seq_len']} | {r['micro_batch']} x {r['grad_accum']} | "
                     f"{r['tokens_per_s']:.0f} | {r['max_memory_reserved_mib']:.0f} |")
    for mb in (1, 4):
        full = [r for r in rows if r["case"] == f"1.3b-lora-mb{mb}-full-loss"]
        ch = [r for r in rows if r["case"] == f"1.3b-lora-mb{mb}-chunked-loss"]
        mem = min(r["max_memory_reserved_mib"] for r in ch) / min(r["max_memory_reserved_mib"] for r in full)
        spd = [c["tokens_per_s"] / f["tokens_per_s"] for c, f in zip(ch, full, strict=True)]
        lines.append(f"\nmb {mb}: chunked/full reserved memory {mem:.2f}x, tokens/s "
                     f"{sorted(spd)[len(spd) // 2]:.2f}x ({min(spd):.2f}..{max(spd):.2f})")
    results = bench_memory.run(24, [1024, 2048], [1, 4], a.memory_rounds, "cuda")
    lines += ["", bench_memory.table(results, 24, "cuda")]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
