"""`uff-port plan`: will this model train on this hardware, and with which settings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from uff_port.planner.search import DEFAULT_GLOBAL_BATCH, DEFAULT_MARGIN, DEFAULT_MB_MAX

EXIT_OK = 0
EXIT_NOTHING_FITS = 1
EXIT_BAD_ARGS = 2
EXIT_NO_GPU = 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate GPU/CPU memory of training configs and recommend one that fits",
        description=(
            "Estimate peak memory per GPU and host RAM for full, LoRA and QLoRA fine-tuning "
            "on this hardware, and recommend the fastest configuration that fits."
        ),
    )
    p.add_argument("--model", default="deepseek-coder-6.7b",
                   help="deepseek-coder-6.7b | deepseek-coder-1.3b | HF id (local cache) | local dir")
    p.add_argument("--revision", default=None, help="hub revision to look up in the cache")
    p.add_argument("--gpus", default=None,
                   help="COUNTxSIZE, e.g. 1x16GiB, 2x16GiB; 'none' for CPU (default 1x16GiB; with --config, "
                        "distributed.nproc x 16GiB, or none for a CPU config)")
    p.add_argument("--cpu-ram", default=None, help="host RAM, e.g. 128GiB (default: not checked)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-max", type=int, default=DEFAULT_MB_MAX)
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="fraction of each memory kept free (default 0.1)")
    p.add_argument("--methods", default="lora,qlora",
                   help="methods the recommendation may use (full,lora,qlora); all are listed")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=DEFAULT_GLOBAL_BATCH,
                   help="sequences per optimizer step; sets grad_accum_steps in --write-config")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--loss", default="chunked", choices=["chunked", "full"],
                   help="training.loss: chunked (the default) or the full logits, as before")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--all", action="store_true", help="list every candidate, not one row per shape")
    p.add_argument("--write-config", metavar="PATH", default=None,
                   help="write the recommended configuration as a ready YAML config")
    p.add_argument("--platform", default=None,
                   help="plan for a cloud platform: kaggle-t4x2, sagemaker-g5.xlarge, sagemaker-g4dn.xlarge, "
                        "sagemaker-p3.2xlarge (sets --gpus; adds precision, strategy and an epoch estimate)")
    p.add_argument("--corpus-tokens", type=int, default=None, help="corpus size in tokens, for --platform's estimate")
    p.add_argument("--data", default=None, help="corpus JSONL file; its size / 3.5 bytes per token stands in for --corpus-tokens")
    p.add_argument("--config", default=None,
                   help="a training config (YAML or preset): plan its model and seq_len, check it, and estimate "
                        "its hours per epoch beside the recommendation's")
    p.add_argument("--tflops", type=float, default=None,
                   help="dense fp16/bf16 TFLOPS per GPU for the time estimate (default 65, a T4)")
    p.add_argument("--utilisation", type=float, default=None, help="assumed share of --tflops reached (default 0.3)")
    p.add_argument("--probe", action="store_true",
                   help="GPU only: run 3 real steps of the top candidates and compare with the estimate")
    p.set_defaults(func=run)


def _args_map(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": ns.model, "revision": ns.revision, "gpus": ns.gpus, "cpu_ram": ns.cpu_ram,
        "seq_len": ns.seq_len, "micro_batch_max": ns.micro_batch_max, "margin": ns.margin,
        "methods": ns.methods, "lora_r": ns.lora_r, "global_batch": ns.global_batch, "attn": ns.attn,
        "loss": ns.loss,
    }


def _ckpt_cell(r: dict[str, Any]) -> str:
    ck = r["gradient_checkpointing"]
    cell = "every 2nd" if ck == "every_other" else ("on" if ck else "off")
    return cell + ("+offload" if r.get("offload_activations") else "")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _table(result: dict[str, Any], show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    model = result["model"]
    console = Console(file=sys.stdout, width=160)
    rows = result["candidates"] if show_all else result["summary"]
    gpus = result["gpus"]
    cap = f"{len(gpus)}x{gpus[0] / 2**30:.0f}GiB" if gpus else "CPU only"
    unit = "GiB per GPU" if gpus else "GiB of RAM; lora/train = params+grads+AdamW"
    t = Table(title=f"{model['name']} ({model['n_params'] / 1e9:.2f}B params), seq {result['seq_len']}, "
                    f"{cap}, margin {result['margin']:.0%}  ({unit})")
    for col in ("method", "strategy", "ckpt", "mb", "weights", "lora/train", "grads", "optim",
                "activ", "logits", "overhead", "GPU total", "CPU RAM", "fits", "speed"):
        t.add_column(col, justify="right" if col not in ("method", "strategy", "fits") else "left")
    rec = result["recommended"]["label"] if result["recommended"] else None
    for r in rows:
        # CPU-only: the same columns, from the host breakdown (fp32 throughout).
        g = r["gpu"] if gpus else {"weights": r["cpu"].get("weights", 0),
                                   "trainable_params": r["cpu"].get("trainable_state", 0),
                                   "activations": r["cpu"].get("activations", 0)}
        fits = "yes" if r["fits"] else ("no (CPU)" if r["fits_gpu"] else "no")
        style = "bold green" if r["label"] == rec else (None if r["fits"] else "dim")
        t.add_row(
            r["method"], f"{r['strategy']} x{r['nproc']}", _ckpt_cell(r),
            str(r["micro_batch"]), _gib(g.get("weights", 0)), _gib(g.get("trainable_params", 0)),
            _gib(g.get("gradients", 0)), _gib(g.get("optimizer", 0)), _gib(g.get("activations", 0)),
            _gib(g.get("logits", 0)), _gib(g.get("overhead", 0) + g.get("cuda_context", 0)),
            _gib(r["gpu_total"]), _gib(r["cpu_total"]), fits, f"{r['score']:.2f}", style=style,
        )
    console.print(t)
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning[/yellow]: {warning}")
    if rec:
        console.print(f"recommended: [bold]{rec}[/bold]  overrides: {json.dumps(result['overrides'])}")
    else:
        console.print("[red]nothing fits[/red]: try a shorter --seq-len, more GPUs, or --methods qlora")


def _platform_lines(adv: dict[str, Any]) -> None:
    print(f"platform {adv['platform']}: {adv['offer']}; {adv['gpu']}, "
          f"{'bf16' if adv['bf16'] else 'fp16 (no bf16)'}, {'FlashAttention' if adv['flash_attention'] else 'no FlashAttention'}")
    if adv.get("note"):
        print(f"  {adv['note']}")
    if adv.get("overrides"):
        print(f"  platform overrides: {json.dumps(adv['overrides'])}")
    if adv.get("hours_per_epoch") is not None:
        print(f"  estimated {adv['hours_per_epoch']} h per epoch of {adv['corpus_tokens']:,} tokens")


def _corpus_tokens(ns: argparse.Namespace, cfg: Any) -> tuple[int | None, str]:
    """Tokens per epoch: --corpus-tokens (`uff-port data inspect` counts them), else bytes / 3.5."""
    if ns.corpus_tokens:
        return int(ns.corpus_tokens), "--corpus-tokens"
    path = ns.data
    if path is None and cfg is not None and isinstance(cfg.data.path, str):
        path = cfg.data.path
        if path == "builtin:sample-corpus":
            import importlib.resources

            path = str(importlib.resources.files("uff_port") / "assets" / "sample_corpus.jsonl")
    try:
        return (int(Path(path).stat().st_size / 3.5), f"{path}: bytes / 3.5") if path else (None, "")
    except (OSError, ValueError):
        return None, ""


def _epoch(ns: argparse.Namespace, cfg: Any, result: dict[str, Any], gpus: list[int]) -> dict[str, Any]:
    """Hours per epoch for the recommendation and, with --config, for that config (and whether it fits)."""
    from uff_port.planner.throughput import (
        CPU_TFLOPS,
        DEFAULT_TFLOPS,
        DEFAULT_UTILISATION,
        epoch_estimate,
    )

    tflops = ns.tflops or (DEFAULT_TFLOPS if gpus else CPU_TFLOPS)
    util = ns.utilisation or DEFAULT_UTILISATION
    tokens, source = _corpus_tokens(ns, cfg)
    n = int(result["model"]["n_params"])
    out: dict[str, Any] = {"corpus_tokens": tokens, "tokens_from": source}
    best = result.get("_best")
    if best is not None:
        out["recommended"] = epoch_estimate(n, best.est.candidate, tokens, tflops, util)
    if cfg is not None:
        from uff_port.planner.guard import candidate_of, check_config

        devices = [{"index": i, "name": "planned", "memory_total": b} for i, b in enumerate(gpus)]
        fit = check_config(cfg, devices)
        out["config"] = {**epoch_estimate(n, candidate_of(cfg), tokens, tflops, util), "name": ns.config,
                         "fits": fit.fits, "fit": fit.message, "code": None if fit.fits else fit.code,
                         "nearest_fit": fit.nearest_fit, "rollout": fit.details.get("rollout")}
    return out


def _epoch_lines(epoch: dict[str, Any]) -> None:
    rows = [(k, epoch[k]) for k in ("config", "recommended") if epoch.get(k)]
    if not rows:
        return
    tokens = epoch["corpus_tokens"]
    head = f"time per epoch of {tokens:,} tokens ({epoch['tokens_from']})" if tokens else "time (no corpus given)"
    print(f"{head}, {rows[0][1]['label']}:")
    for kind, e in rows:
        name = f"config {e['name']}" if kind == "config" else "recommended"
        hours = f"{e['hours_per_epoch']:.3g} h per epoch" if e["hours_per_epoch"] is not None else \
            f"{e['hours_per_10m_tokens']:.3g} h per 10M tokens"
        fit = "" if kind != "config" else ("  fits" if e["fits"] else f"  does not fit ({e['code']}): {e['fit']}")
        print(f"  {name} ({e['candidate']}): ~{e['tokens_per_s']:,.0f} tokens/s, {hours}{fit}")
        if kind == "config" and e.get("nearest_fit"):
            sets = " ".join(f"--set {k}={_set_value(v)}" for k, v in e["nearest_fit"].items())
            print(f"  to fit: uff-port train {e['name']} {sets}")


def _set_value(v: Any) -> str:
    """A value as `--set` parses it (YAML): true/false/null, numbers, plain strings."""
    return json.dumps(v) if isinstance(v, (bool, type(None))) or not isinstance(v, str) else v


def run(ns: argparse.Namespace) -> int:
    from uff_port.planner.arch import ArchError
    from uff_port.planner.commands import PlanArgs, compute, public

    preset = None
    if ns.platform is not None:
        from uff_port.cloud.platforms import PLATFORMS

        preset = PLATFORMS.get(ns.platform)
        if preset is None:
            print(f"uff-port plan: --platform: unknown {ns.platform!r}; expected one of {sorted(PLATFORMS)}", file=sys.stderr)
            return EXIT_BAD_ARGS
        ns.gpus = preset.gpus
        if not preset.flash_attention and ns.attn == "flash_attention_2":
            ns.attn = "sdpa"
    cfg = None
    if ns.config is not None:
        from uff_port.core.config import ConfigError, load_config

        try:
            cfg = load_config(ns.config)
        except ConfigError as exc:
            print(f"uff-port plan: --config: {exc}", file=sys.stderr)
            return EXIT_BAD_ARGS
        ns.model, ns.revision, ns.seq_len, ns.lora_r = (cfg.model.name_or_path, cfg.model.revision, cfg.data.seq_len,
                                                       cfg.lora.r)
        if ns.gpus is None:
            ns.gpus = "none" if cfg.training.device == "cpu" else f"{cfg.distributed.nproc}x16GiB"
    if ns.gpus is None:
        ns.gpus = "1x16GiB"
    a = PlanArgs(_args_map(ns))
    if a.problems:
        for problem in a.problems:
            print(f"uff-port plan: {problem}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if ns.probe:
        from uff_port.planner.probe import ProbeUnavailable, probe_available

        try:
            probe_available()
        except ProbeUnavailable as exc:
            print(f"uff-port plan --probe: {exc}", file=sys.stderr)
            return EXIT_NO_GPU
    try:
        result = compute(a)
    except ArchError as exc:
        print(f"uff-port plan: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if preset is not None:
        from uff_port.cloud.platforms import platform_advice

        tokens = ns.corpus_tokens or (int(Path(ns.data).stat().st_size / 3.5) if ns.data else None)
        result["platform"] = platform_advice(preset, result, tokens, ns.attn)
    result["epoch"] = _epoch(ns, cfg, result, a.gpus)
    if ns.json:
        print(json.dumps(public(result), indent=1))
    else:
        _table(result, ns.all)
        if preset is not None:
            _platform_lines(result["platform"])
        _epoch_lines(result["epoch"])
    if ns.write_config and result["_best"] is not None:
        from uff_port.planner.commands import write_config

        write_config(result, Path(ns.write_config), a.global_batch, (result.get("platform") or {}).get("overrides"))
        print(f"wrote {ns.write_config}", file=sys.stderr)
    if ns.probe:
        from uff_port.planner.probe import probe_top

        for line in probe_top(result):
            print(line)
    return EXIT_OK if result["_best"] is not None else EXIT_NOTHING_FITS
