"""GPU training figures at real DeepSeek-Coder dimensions (random weights), with our trainer.

    python scripts/bench_gpu_training.py                  # 1.3B LoRA, 6.7B QLoRA (16 GiB cap), 1.3B baseline ratio
    python scripts/bench_gpu_training.py --only 6.7b-qlora --seq-len 2048 --steps 8

For each case: tokens/s (after warm-up steps), torch.cuda.max_memory_reserved,
NVML memory used, and MFU (6 * params * tokens/s over the device's dense bf16
peak; LoRA skips weight gradients, so this slightly overstates the work done,
and gradient checkpointing's recompute is not counted). The 6.7B QLoRA case
runs under `torch.cuda.set_per_process_memory_fraction` for 16 GiB: it must
fit a 16 GB card at sequence length 2048. The ratio line compares the 1.3B
preset against the same run without packing, in the same invocation.

Weights are random (no download): the model is built from the real config,
saved once under $UFF_PORT_CACHE/bench-models/, and loaded by the trainer
through the same from_pretrained path as a real checkout.
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
# Dense bf16 peak TFLOP/s by device name fragment (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "5060 Ti": 93.0, "4090": 165.0}


def build_random_model(arch: str) -> Path:
    """Real dimensions, random weights, saved once (bf16 safetensors) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from uff_port.training.builtin import cache_dir, ensure_tiny_llama

    out = cache_dir() / "bench-models" / f"deepseek-coder-{arch}-random"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(ensure_tiny_llama(), local_files_only=True)
    cfg = LlamaConfig(**ARCH[arch], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    os.replace(tmp, out)
    return out


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
    model_dir = build_random_model(case["arch"])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    if case["cap_gib"]:
        torch.cuda.set_per_process_memory_fraction(min(1.0, case["cap_gib"] * 2**30 / total))
    else:
        torch.cuda.set_per_process_memory_fraction(1.0)
    overrides = {
        "model.name_or_path": str(model_dir),
        "model.local_files_only": True,
        "data.seq_len": a.seq_len,
        "data.packing": packing,
        "data.eval_fraction": 0.0,
        "training.max_steps": a.warmup + a.steps,
        "training.device": "cuda",
        "checkpoint.every_steps": None,
        "eval.every_steps": None,
        "output.save_final": False,
    }
    overrides.update(case.get("overrides", {}))
    if a.grad_accum:
        overrides["training.grad_accum_steps"] = a.grad_accum
    cfg = load_config(ROOT / "configs" / case["preset"], overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), reporter=Reporter(Path(tmp)), inbox=Inbox(), fresh=True)
        tr.setup()
        n_params = sum(p.numel() for p in tr.model.parameters())
        tokens = 0
        t0 = 0.0
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            seqs = tr.data.take(tr.micro * tr.accum)
            tr._step(seqs, [])  # noqa: SLF001 - the loop body without events
            tr.step += 1
            if i >= a.warmup:
                tokens += sum(sum(1 for t in s.input_ids if t != tr.data.pad_id) for s in seqs)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        nvml = nvml_used_mib()
        reserved = torch.cuda.max_memory_reserved() / 2**20
        del tr
    torch.cuda.empty_cache()
    tps = tokens / dt
    dev = torch.cuda.get_device_name(0)
    peak = peak_tflops(dev, a.peak_tflops)
    # The 4-bit model reports packed parameter counts: use the architecture's count for FLOPs.
    arch_params = _arch_params(case["arch"]) if case["arch"] else n_params
    mfu = 6 * arch_params * tps / (peak * 1e12) if peak else None
    return {
        "case": name + ("" if packing else " (no packing)"), "device": dev, "seq_len": a.seq_len,
        "micro_batch": cfg.training.micro_batch_size, "grad_accum": cfg.training.grad_accum_steps,
        "tokens_per_s": tps, "max_memory_reserved_mib": reserved, "nvml_used_mib": nvml,
        "cap_gib": case["cap_gib"], "mfu": mfu, "params": arch_params,
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
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (see docs/benchmarks.md)")
    rows = [run_case(name, a) for name in (a.only or sorted(CASES))]
    baseline = None
    if not a.only or "1.3b-lora" in a.only:
        baseline = run_case("1.3b-lora", a, packing=False)
        rows.append(baseline)
    print(json.dumps(rows, indent=2))
    lines = [
        f"Command: `python scripts/bench_gpu_training.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        "| case | device | seq | micro x accum | tokens/s | max_memory_reserved MiB | NVML used MiB | cap GiB | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['device']} | {r['seq_len']} | {r['micro_batch']} x {r['grad_accum']} | "
            f"{r['tokens_per_s']:.0f} | {r['max_memory_reserved_mib']:.0f} | {r['nvml_used_mib'] or float('nan'):.0f} | "
            f"{r['cap_gib'] or '-'} | {(r['mfu'] or float('nan')) * 100:.1f}% |"
        )
    if baseline is not None:
        packed = next(r for r in rows if r["case"] == "1.3b-lora")
        lines += ["", f"1.3B packing vs no packing (same invocation): **{packed['tokens_per_s'] / baseline['tokens_per_s']:.2f}x** tokens/s"]
    text = "\n".join(lines)
    print(text)
    if a.out:  # only this script's marked section of the doc (scripts/doc_section.py)
        from doc_section import replace_section

        replace_section(a.out, "bench_gpu_training", text)


if __name__ == "__main__":
    main()
