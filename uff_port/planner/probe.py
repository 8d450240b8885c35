"""`plan --probe`: measure a few real steps on the GPU against the estimate.

Each candidate runs in its own process (`python -m uff_port.planner.probe SPEC`)
so that one candidate's cached blocks never inflate the next one's
`max_memory_reserved`. Random weights: no download, same shapes and dtypes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Final

PROBE_STEPS: Final = 3
PROBE_TOP: Final = 3
PROBE_TIMEOUT_S: Final = 900


class ProbeUnavailable(RuntimeError):
    """No CUDA device (or no torch): the probe cannot measure anything here."""


def probe_available() -> None:
    try:
        import torch
    except ImportError:
        raise ProbeUnavailable("needs torch (pip install 'uff-port[train]')") from None
    if not torch.cuda.is_available():
        raise ProbeUnavailable("needs a CUDA GPU and none is visible (run `uff-port plan` without --probe for estimates only)")


def _quantize_nf4(model: Any, double_quant: bool) -> None:
    """Swap every decoder Linear for a bitsandbytes Linear4bit holding the same weights
    (what `from_pretrained(quantization_config=nf4)` does; lm_head stays unquantized)."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                              compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4")
        model.set_submodule(name, q)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model from `spec` (arch + candidate + workload), run steps, read the allocator.

    `spec["device"] == "cpu"` is a dry run of the same code (no memory figures), for tests.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch, cand, wl = spec["arch"], spec["candidate"], spec["workload"]
    on_cpu = spec.get("device") == "cpu"
    dev = torch.device("cpu") if on_cpu else torch.device("cuda", 0)
    if spec.get("cap_bytes") and not on_cpu:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_bytes"] / total), 0)
    cfg: Any = LlamaConfig(  # type: ignore[call-arg]
        hidden_size=arch["hidden"], intermediate_size=arch["intermediate"], num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"], num_key_value_heads=arch["kv_heads"], vocab_size=arch["vocab"],
        max_position_embeddings=max(arch["max_positions"], wl["seq_len"]), head_dim=arch["head_dim"],
        tie_word_embeddings=arch["tie_embeddings"], attn_implementation=wl["attn"], use_cache=False,
    )
    torch.manual_seed(0)
    qlora = cand["method"] == "qlora"
    # Random weights built where they will live (the GPU), in the trainer's bf16; the nf4
    # path builds on the host and quantizes on the way to the GPU, as from_pretrained does.
    model: Any
    with torch.device("cpu" if qlora else dev):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    if qlora:
        from peft import prepare_model_for_kbit_training

        _quantize_nf4(model, wl["double_quant"])
        model.to(dev)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cand["grad_ckpt"])
    elif cand["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cand["method"] != "full":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=wl["lora_r"], lora_alpha=2 * wl["lora_r"], lora_dropout=wl["lora_dropout"],
            target_modules=list(wl["lora_targets"]), task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:  # the trainer keeps adapters in fp32
                p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats(dev)
    ids = torch.randint(0, arch["vocab"], (cand["micro_batch"], wl["seq_len"]), device=dev)
    # The trainer's loss (training/loss.py), so the probe holds what a step holds: the chunked
    # loss never builds the [tokens, vocab] logits that `labels=` in HF's forward would.
    from uff_port.training.loss import loss_sum

    loss = float("nan")
    for _ in range(PROBE_STEPS):
        out = loss_sum(model, {"input_ids": ids, "labels": ids.clone()}, torch.bfloat16,
                       wl.get("loss", "chunked")) / ids.numel()
        out.backward()
        loss = float(out.detach())
        del out
        opt.step()
        opt.zero_grad(set_to_none=True)
    if on_cpu:
        return {"max_memory_reserved": None, "max_memory_allocated": None, "device": "cpu",
                "steps": PROBE_STEPS, "loss": loss}
    torch.cuda.synchronize(dev)
    return {"max_memory_reserved": torch.cuda.max_memory_reserved(dev),
            "max_memory_allocated": torch.cuda.max_memory_allocated(dev),
            "device": torch.cuda.get_device_name(dev), "steps": PROBE_STEPS, "loss": loss}


def run_one(spec: dict[str, Any], timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Measure in a child process; an OOM or crash comes back as {"error": ...}."""
    try:
        proc = subprocess.run([sys.executable, "-m", "uff_port.planner.probe", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def spec_for(result: dict[str, Any], scored: Any, cap_bytes: int | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    return {"arch": asdict(result["_arch"]), "candidate": asdict(scored.est.candidate),
            "workload": asdict(result["_workload"]), "cap_bytes": cap_bytes}


def probe_top(result: dict[str, Any], top: int = PROBE_TOP) -> list[str]:
    """Measure the top fitting single-process candidates; lines of 'estimate vs measured'."""
    from uff_port.planner.search import rank

    ranked = rank([s for s in _scored(result) if s.fits and s.est.candidate.nproc == 1])
    lines = []
    for s in ranked[:top]:
        got = run_one(spec_for(result, s))
        if "error" in got:
            lines.append(f"probe {s.est.candidate.label}: failed ({got['error']})")
            continue
        meas = got["max_memory_reserved"]
        lines.append(f"probe {s.est.candidate.label}: estimated reserved {s.est.reserved / 2**30:.2f} GiB, "
                     f"measured {meas / 2**30:.2f} GiB (estimate/measured {s.est.reserved / meas:.3f})")
    if not ranked:
        lines.append("probe: no single-GPU candidate fits; multi-GPU candidates need torchrun and are not probed")
    return lines


def _scored(result: dict[str, Any]) -> list[Any]:
    from uff_port.planner.estimate import estimate
    from uff_port.planner.search import candidates, judge

    gpus = result["gpus"]
    return [judge(estimate(result["_arch"], c, result["_workload"]), min(gpus) if gpus else None,
                  result["cpu_ram"], result["margin"])
            for c in candidates(len(gpus), ("full", "lora", "qlora"), 8)]


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    spec["workload"]["lora_targets"] = tuple(spec["workload"]["lora_targets"])
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
