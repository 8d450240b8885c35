"""Worker extension command `plan` (runs in a short-lived child process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import confine
from uff_port.planner.arch import DEFAULT_TARGETS, ArchError, resolve_arch
from uff_port.planner.estimate import METHODS, Method, Workload
from uff_port.planner.search import (
    DEFAULT_GLOBAL_BATCH,
    DEFAULT_MARGIN,
    DEFAULT_MB_MAX,
    overrides_for,
    summary_rows,
)
from uff_port.planner.search import plan as run_plan
from uff_port.planner.sizes import SizeError, parse_gpus, parse_size
from uff_port.protocol.errors import CommandError, ErrorCode

MAX_SEQ_LEN: Final = 1 << 20
MAX_MB: Final = 1024


class PlanArgs:
    """Validated `plan` arguments; every problem names its field."""

    def __init__(self, args: dict[str, Any]) -> None:
        problems: list[str] = []

        def get(name: str, default: Any, kind: type | tuple[type, ...]) -> Any:
            v = args.get(name, default)
            if v is None:
                return default
            if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
                problems.append(f"{name}: expected {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
                return default
            return v

        unknown = sorted(set(args) - {"model", "gpus", "cpu_ram", "seq_len", "micro_batch_max", "margin",
                                      "methods", "revision", "lora_r", "global_batch", "attn",
                                      "write_config", "probe", "loss"})
        if unknown:
            problems.append(f"{unknown[0]}: unknown argument")
        self.model: str = get("model", "deepseek-coder-6.7b", str)
        self.revision: str | None = get("revision", None, str)
        self.seq_len: int = get("seq_len", 2048, int)
        self.mb_max: int = get("micro_batch_max", DEFAULT_MB_MAX, int)
        self.margin: float = float(get("margin", DEFAULT_MARGIN, (int, float)))
        self.lora_r: int = get("lora_r", 16, int)
        self.global_batch: int = get("global_batch", DEFAULT_GLOBAL_BATCH, int)
        self.attn: str = get("attn", "sdpa", str)
        self.loss: str = get("loss", "chunked", str)
        self.write_config: str | None = get("write_config", None, str)
        self.probe: bool = get("probe", False, bool)
        methods = get("methods", None, (list, str))
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        self.methods: tuple[Method, ...] = tuple(methods) if methods else ("lora", "qlora")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            problems.append(f"methods: unknown {bad}; expected some of {list(METHODS)}")
        if not 1 <= self.seq_len <= MAX_SEQ_LEN:
            problems.append(f"seq_len: must be 1..{MAX_SEQ_LEN}, got {self.seq_len}")
        if not 1 <= self.mb_max <= MAX_MB:
            problems.append(f"micro_batch_max: must be 1..{MAX_MB}, got {self.mb_max}")
        if not 0.0 <= self.margin < 0.9:
            problems.append(f"margin: must be in [0, 0.9), got {self.margin}")
        if self.lora_r <= 0:
            problems.append(f"lora_r: must be > 0, got {self.lora_r}")
        if self.global_batch <= 0:
            problems.append(f"global_batch: must be > 0, got {self.global_batch}")
        if self.attn not in ("sdpa", "eager", "flash_attention_2"):
            problems.append(f"attn: expected sdpa, eager or flash_attention_2, got {self.attn!r}")
        if self.loss not in ("chunked", "full"):
            problems.append(f"loss: expected chunked or full, got {self.loss!r}")
        self.gpus: list[int] = []
        self.cpu_ram: int | None = None
        try:
            self.gpus = parse_gpus(get("gpus", "1x16GiB", str), "gpus")
        except SizeError as exc:
            problems.append(str(exc))
        try:
            ram = args.get("cpu_ram")
            self.cpu_ram = parse_size(ram, "cpu_ram") if ram is not None else None
        except SizeError as exc:
            problems.append(str(exc))
        self.problems = problems


TYPICAL_HOST_RAM: Final = 32 * 2**30
"""Host RAM of a common 1-2 GPU machine: the preset for 2 x 16 GB (QLoRA + DDP) is the pick there."""


def compute(a: PlanArgs) -> dict[str, Any]:
    """The plan as a map: the model, every candidate (ranked), summary and recommendation."""
    arch = resolve_arch(a.model, a.revision)
    on_gpu = bool(a.gpus)
    wl = Workload(seq_len=a.seq_len, device="cuda" if on_gpu else "cpu",
                  compute_bytes=2 if on_gpu else 4, lora_r=a.lora_r,
                  lora_targets=DEFAULT_TARGETS, attn=a.attn,
                  loss="full" if a.loss == "full" else "chunked")
    # Every method is listed; the recommendation only uses the ones asked for.
    ranked, best = run_plan(arch, wl, a.gpus, a.cpu_ram, margin=a.margin, mb_max=a.mb_max,
                            methods=METHODS, recommend_from=a.methods)
    warnings = []
    if best is not None and on_gpu and a.cpu_ram is None:
        # Host RAM unchecked: say when a common host could not hold the pick, and what the pick is there.
        _, host_best = run_plan(arch, wl, a.gpus, TYPICAL_HOST_RAM, margin=a.margin, mb_max=a.mb_max,
                                methods=METHODS, recommend_from=a.methods)
        if host_best is None or host_best.est.candidate != best.est.candidate:
            there = host_best.est.candidate.label if host_best else "nothing"
            warnings.append(f"{best.est.candidate.label} needs ~{best.est.cpu_total / 2**30:.0f} GiB of host RAM "
                            f"(not checked: no --cpu-ram); with {TYPICAL_HOST_RAM // 2**30} GiB the pick is {there}")
    if arch.max_positions and a.seq_len > arch.max_positions:
        warnings.append(f"seq_len: {a.seq_len} exceeds the model's max_position_embeddings "
                        f"({arch.max_positions}); memory is estimated anyway")
    return {
        "warnings": warnings,
        "model": arch.to_dict(),
        "gpus": a.gpus,
        "cpu_ram": a.cpu_ram,
        "seq_len": a.seq_len,
        "margin": a.margin,
        "ranking": "nproc x strategy(ddp .9, zero2 .85, zero3 .7, offload .3) x method(lora 1, "
                   "qlora .7, full .65) x (0.75 with checkpointing) x (1 - 0.2/micro_batch)",
        "summary": [s.to_dict() for s in summary_rows(ranked)],
        "candidates": [s.to_dict() for s in ranked],
        "recommended": best.to_dict() if best else None,
        "overrides": overrides_for(best.est.candidate, a.global_batch) if best else None,
        "_workload": wl,
        "_arch": arch,
        "_best": best,
    }


def write_config(
    result: dict[str, Any], out: Path, global_batch: int, extra: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write the recommended candidate as a ready config (validated before it is written).

    `extra`: dotted overrides on top (a platform's precision, strategy and cloud keys)."""
    import json

    from uff_port.core.config import dump_yaml, validate_config
    from uff_port.fsutil import atomic_write_text
    from uff_port.planner.search import config_for

    best = result["_best"]
    raw, ds = config_for(result["_arch"], result["_workload"], best.est.candidate, global_batch)
    written = {"config_path": str(out)}
    if ds is not None:  # no preset in configs/deepspeed: write one beside the config
        ds_path = out.with_suffix(".deepspeed.json")
        atomic_write_text(ds_path, json.dumps(ds, indent=2) + "\n")
        raw["distributed"]["deepspeed_config"] = str(ds_path)
        written["deepspeed_config"] = str(ds_path)
    cfg = validate_config(raw, extra)
    atomic_write_text(out, f"# written by `uff-port plan`: {best.est.candidate.label}\n" + dump_yaml(cfg))
    return written


def public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def plan(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Worker command: same arguments as `uff-port plan`, as a map; writes nothing."""
    if not isinstance(args, dict):
        raise CommandError(ErrorCode.INVALID_ARGS, "args: expected a map")
    a = PlanArgs(args)
    if a.problems:
        raise CommandError(ErrorCode.INVALID_ARGS, "; ".join(a.problems), {"problems": a.problems})
    if a.probe:
        raise CommandError(ErrorCode.NOT_AVAILABLE,
                           "probe: measuring runs for minutes on the GPU; run `uff-port plan --probe` there")
    root = getattr(ctx, "runs_root", None)
    out_path = None
    if a.write_config is not None:
        if root is None:
            raise CommandError(ErrorCode.INVALID_ARGS, "write_config: no run root to write under")
        try:
            out_path = confine(root, a.write_config)
        except ValueError as exc:
            raise CommandError(ErrorCode.INVALID_ARGS, f"write_config: {exc}") from None
    if a.model.startswith(("/", "~", ".")):
        # A filesystem path from a client must stay under the worker's run root.
        if root is None:
            raise CommandError(ErrorCode.INVALID_ARGS, "model: paths are not accepted here; use a builtin or hub id")
        try:
            a.model = str(confine(root, Path(a.model).expanduser()))
        except ValueError as exc:
            raise CommandError(ErrorCode.INVALID_ARGS, f"model: {exc}") from None
    try:
        result = compute(a)
    except ArchError as exc:
        raise CommandError(ErrorCode.INVALID_ARGS, str(exc)) from None
    out = public(result)
    out["candidates"] = out["candidates"][:50]  # keep the reply frame small
    if out_path is not None and result["_best"] is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out["written"] = write_config(result, out_path, a.global_batch)
    return out
