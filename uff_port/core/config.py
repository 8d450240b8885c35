"""The one training config schema, validated before anything heavy starts.

Torch-free on purpose: the worker validates `train` requests with it in
milliseconds. Every problem is reported at once, by dotted path
(`lora.r: must be > 0`), so a user fixes a config in one go.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from uff_port.core.config_io import (
    ConfigLimitError,
    check_tree,
    dotted,
    parse_config_text,
    read_config_bytes,
)

# The presets ship inside the package (`uff_port/presets`, the top-level `configs/`
# directory: a link in a checkout, files in a wheel), so an installed worker has them.
# Installs are plain directories, so the resource is a real path.
PRESETS_DIR: Final = Path(str(importlib.resources.files("uff_port") / "presets"))
MANAGER_DOMAINS: Final = ("ufm", "ucm", "urm", "ulm", "uim", "uam")


class ConfigError(Exception):
    """A config that cannot be used; `problems` are 'dotted.path: message' strings."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


class _Section(BaseModel):
    # Strict: `max_steps: true` is not 1 and `learning_rate: "1e-3"` is not a number
    # (an int is still a float). Non-finite numbers are refused where a float is read.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _manager_domain(value: str) -> str:
    low = value.lower()
    if low not in MANAGER_DOMAINS:
        raise ValueError(f"unknown manager domain; expected one of {list(MANAGER_DOMAINS)}")
    return low


def _ckpt_spelling(v: bool | str) -> bool | str:
    # One spelling per meaning, so resume hashes and the planner see true/false as before.
    return {"off": False, "every_layer": True}.get(v, v) if isinstance(v, str) else v


class ModelConfig(_Section):
    name_or_path: str = "builtin:tiny-llama"
    """HF hub id, local directory, or `builtin:tiny-llama` (built locally on first use)."""
    revision: str | None = None
    local_files_only: bool = False
    """Never touch the network; a missing model is a clear error, not a download."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: Annotated[
        bool | Literal["off", "every_layer", "every_other"], AfterValidator(_ckpt_spelling)
    ] = False
    """Recompute activations in backward: `every_layer` (same as true), `every_other` (half the
    layers: about half the saving for half the extra forward), `off` (same as false)."""
    offload_activations: bool = False
    """CUDA only: keep the tensors saved for backward in pinned host memory
    (torch.autograd.graph.save_on_cpu); with checkpointing that is the layers' inputs."""
    trust_remote_code: bool = False
    init_adapter: str | None = None
    """A LoRA adapter directory (adapter_model.safetensors) the new adapter starts from; a
    fresh start only (a resume loads its checkpoint). Recorded as `lineage.parent`."""


class DataConfig(_Section):
    path: str | list[str] = "builtin:sample-corpus"
    """One JSONL file or a list of them (contract key)."""
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    managers: list[Annotated[str, AfterValidator(_manager_domain)]] | None = None
    """Keep only records whose `manager` is one of these (lower-case domain names)."""
    stages: list[str] | None = None
    seq_len: int = Field(512, gt=0)
    packing: bool = True
    completion_only_loss: bool = True
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_bad_lines: int = Field(100, ge=0)
    shuffle_buffer: int = Field(0, ge=0)
    max_line_bytes: int = Field(4 << 20, gt=0)
    """A longer JSONL line is a bad line: skipped unread and untokenised, never held in memory."""
    max_bad_line_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Share of bad lines in the corpus scan before training above which the run stops
    (`too_many_bad_lines`) instead of training on what is left."""
    chat_template: str | None = None
    """For `messages` records when the tokenizer has no chat template: a named template
    (CHAT_TEMPLATES, e.g. `deepseek-coder`) or a Jinja string. The tokenizer's own wins."""

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is None or v in CHAT_TEMPLATES:
            return v
        if "{{" in v or "{%" in v:
            import jinja2  # light; a template that does not parse is refused here, not per line

            try:
                jinja2.Environment().parse(v)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"the Jinja template does not parse (line {exc.lineno}: {exc.message})") from None
            return v
        raise ValueError(f"unknown chat template {v!r}{did_you_mean(v, CHAT_TEMPLATES)}; expected one of "
                         f"{', '.join(sorted(CHAT_TEMPLATES))} or a Jinja string")


class LoraConfig(_Section):
    enabled: bool = True
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class QuantizationConfig(_Section):
    mode: Literal["none", "nf4"] = "none"
    """`nf4` is QLoRA (bitsandbytes 4-bit NormalFloat); CUDA, or CPU with bitsandbytes >= 0.50."""
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class TrainingConfig(_Section):
    max_steps: int = Field(100, gt=0)
    """Optimizer steps to train in total (contract key)."""
    num_epochs: float | None = Field(None, gt=0)
    """Instead of max_steps (exactly one of them): passes over the training split; the trainer
    turns it into max_steps from the corpus (`uff-port data inspect` shows steps per epoch)."""

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        # `max_steps: null` (say over a preset that sets it) leaves num_epochs to decide.
        if isinstance(data, dict) and "max_steps" in data and data["max_steps"] is None:
            data = {k: v for k, v in data.items() if k != "max_steps"}
        return data
    seed: int = 1234
    """Seeds python, numpy and torch on every rank (contract key)."""
    micro_batch_size: int = Field(4, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_runtime: float | None = Field(None, gt=0)
    """Wall-clock budget in seconds (a Kaggle session): stop with a checkpoint before it ends."""
    progress_every_seconds: float = Field(0.5, ge=0)
    """Rate limit of `progress` events at the source."""
    skip_nonfinite_steps: int = Field(0, ge=0)
    """Batches whose loss or gradient norm is NaN/Inf that may be skipped (no update) before
    the run fails with `non_finite`; 0 fails at the first. Counted over the whole run."""
    cpu_threads: int | None = Field(None, gt=0)
    """Torch threads when training on CPU; null = torch's default (every core). 1 is
    fastest on a shared, busy machine, where OpenMP threads wait on each other."""
    deterministic: bool = False
    """CUDA: deterministic kernels only (`torch.use_deterministic_algorithms`), so two runs,
    or a run and its resume, give the same bits; slower. CPU kernels already are."""
    loss: Literal["chunked", "full"] = "chunked"
    """`chunked`: cross-entropy a chunk of target tokens at a time, never the whole
    [tokens, vocab] logits (training/loss.py); `full`: from the model's logits, as HF does."""


class CheckpointConfig(_Section):
    every_steps: int | None = Field(50, gt=0)
    """Checkpoint every N optimizer steps (contract key); null disables."""
    every_seconds: float | None = Field(None, gt=0)
    keep_last: int = Field(3, gt=0)
    grace_seconds: float = Field(100.0, gt=0)
    """How long a stop/SIGTERM/EOF may take to write its final checkpoint."""


class DistributedConfig(_Section):
    nproc: int = Field(1, gt=0)
    backend: Literal["auto", "ddp", "deepspeed"] = "auto"
    deepspeed_config: str | None = None
    master_port: int | None = Field(None, gt=0, lt=65536)
    nnodes: int = Field(1, gt=0)
    """Machines of one run (torchrun multi-node); each runs `nproc` processes."""
    node_rank: int | None = Field(None, ge=0)
    """This machine's index; default $UFF_PORT_NODE_RANK, else 0."""
    master_addr: str | None = None
    """Address of node 0 (rendezvous); default $UFF_PORT_MASTER_ADDR, else 127.0.0.1."""


class SuiteEvalConfig(_Section):
    """A code-evaluation suite run during training (uff_port.eval.training, docs/eval.md)."""

    suite: str = Field(min_length=1)
    every_steps: int | None = Field(None, gt=0)
    sample: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(8, gt=0)
    timeout: float = Field(10.0, gt=0)


class EvalConfig(_Section):
    every_steps: int | None = Field(50, gt=0)
    max_batches: int = Field(20, gt=0)
    # left out of the dump when empty, so configs without suites keep their config_hash
    suites: list[SuiteEvalConfig] = Field(default_factory=list, exclude_if=lambda v: not v)
    # a fixed held-out file for the loss, shared by runs so their eval_loss compares
    path: str | None = Field(None, min_length=1, exclude_if=lambda v: v is None)


# The built-in reward functions and the options each takes (type checked at validation).
REWARD_OPTIONS: Final[dict[str, dict[str, type]]] = {
    "tests": {},
    "parses": {},
    "forbidden": {},
    "length": {"budget": int, "shaped": bool},
    "format": {"pattern": str, "mode": str},
}
_OPTION_WORDS: Final = {int: "an integer > 0", bool: "true or false", str: "a string"}


class RewardSpec(_Section):
    """One reward function of the RL stage (uff_port.training.rewards, docs/rl.md)."""

    name: str = Field(min_length=1)
    """`tests` (the task's tests in the sandbox), `parses`, `length`, `format`, `forbidden`,
    or a plug-in scorer (`module:function`, `file.py:function`, an entry point)."""
    weight: float = 1.0
    """Its weight in the total reward (a weighted sum); negative weights penalise."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Per-function options (`length`: budget, shaped; `format`: pattern, mode)."""

    @model_validator(mode="after")
    def _check_options(self) -> RewardSpec:
        allowed = REWARD_OPTIONS.get(self.name)
        if allowed is None:
            if ":" not in self.name and not self.name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"reward {self.name!r}: expected one of {sorted(REWARD_OPTIONS)}, "
                                 "module:function, file.py:function or an entry point name")
            return self
        for key, value in self.options.items():
            kind = allowed.get(key)
            if kind is None:
                raise ValueError(f"reward {self.name}: option {key!r} unknown; expected some of {sorted(allowed)}")
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or (isinstance(value, int) and value <= 0))):
                raise ValueError(f"reward {self.name}: option {key!r} must be {_OPTION_WORDS[kind]}")
        if self.name == "format":
            import re

            if "pattern" not in self.options:
                raise ValueError("reward format: option 'pattern' (a regular expression) is required")
            try:
                re.compile(self.options["pattern"])
            except re.error as exc:
                raise ValueError(f"reward format: pattern does not compile: {exc}") from None
            if self.options.get("mode", "search") not in ("search", "fullmatch"):
                raise ValueError("reward format: mode must be search or fullmatch")
        return self


class RLConfig(_Section):
    """The reinforcement-learning stage (`stage: rl`): GRPO on rewards from executed code."""

    algorithm: Literal["grpo"] = "grpo"
    """Group-relative policy optimisation: advantages normalised within each prompt's group."""
    prompts: str = "components"
    """Prompts: a shipped evaluation suite by name (`components`, `ufm`, ...) or a JSONL path
    in the evaluator's suite format (docs/eval.md)."""
    managers: list[Annotated[str, AfterValidator(_manager_domain)]] | None = None
    """Keep only tasks whose `manager` is one of these."""
    stages: list[str] | None = None
    """Keep only tasks whose `stage` is one of these."""
    prompts_per_step: int = Field(4, gt=0)
    """Prompts of one generation batch (each gets `num_generations` completions)."""
    num_generations: int = Field(4, ge=2)
    """G: completions per prompt; the group whose rewards normalise the advantages."""
    max_prompt_tokens: int = Field(256, gt=0)
    """Longer prompts keep their last tokens."""
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    iterations: int = Field(1, gt=0)
    """Optimizer steps per generation batch (PPO epochs; TRL's num_iterations)."""
    clip_epsilon: float = Field(0.2, gt=0, lt=1.0)
    """PPO's clip range of the probability ratio, [1 - eps, 1 + eps]."""
    kl_beta: float = Field(0.0, ge=0)
    """Weight of the k3 KL estimate to the reference policy (the base weights with the
    LoRA adapter disabled); 0 computes no reference at all."""
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="tests")])
    reward_workers: int = Field(2, gt=0)
    """Sandbox processes scoring completions in parallel."""
    reward_timeout: float = Field(10.0, gt=0)
    """Seconds a completion's tests may run in the sandbox."""
    sft_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of optimizer steps that are supervised steps on `sft_path` (interleaved)."""
    sft_path: str | list[str] | None = None
    """The SFT corpus of the mix; default `data.path`."""


class OutputConfig(_Section):
    save_final: bool = True
    merge: bool = False
    plot: bool = True
    """RUN_DIR/training.png, drawn by the trainer at each checkpoint and at the end."""
    # Left out of the dump when off, so configs that do not use them keep their config_hash.
    metrics_csv: bool = Field(False, exclude_if=lambda v: not v)
    """RUN_DIR/metrics.csv: one row per reported step (loss, lr, grad norm, tokens/s, eval loss)."""
    tensorboard: bool = Field(False, exclude_if=lambda v: not v)
    """RUN_DIR/tensorboard/ event files; needs the `tensorboard` package (the `tensorboard` extra)."""


def resolve_deepspeed_config(name: str) -> tuple[Path | None, list[Path]]:
    """(the DeepSpeed JSON `distributed.deepspeed_config` names, or None; the places tried).

    An absolute path, else relative to the working directory, else a preset:
    `deepspeed/zero2.json` or `configs/deepspeed/zero2.json` (as a checkout spells it).
    """
    p = Path(name).expanduser()
    if p.is_absolute():
        tried = [p]
    else:
        tried = [Path.cwd() / p, PRESETS_DIR / p]
        if p.parts[:1] == ("configs",):
            tried.append(PRESETS_DIR.joinpath(*p.parts[1:]))
    return next((t for t in tried if _exists(t, regular=True)), None), tried


def deepspeed_zero_stage(name: str | None) -> int | None:
    """The ZeRO stage a DeepSpeed JSON asks for (2 when none is named); None when the file
    cannot be found or read here: the trainer, on the machine that trains, reports that."""
    if name is None:
        return 2  # the trainer's default: ZeRO-2 with DeepSpeed's defaults
    path, _ = resolve_deepspeed_config(name)
    if path is None:
        return None
    try:
        raw = json.loads(read_config_bytes(path, "distributed.deepspeed_config"))
        stage = raw.get("zero_optimization", {}).get("stage", 0)
    except (ConfigLimitError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def cross_section_problems(cfg: Config) -> list[tuple[tuple[str, ...], str]]:
    """Problems that involve more than one section, as (dotted path, message) pairs.

    They are checked here, at validation, so a config the trainer would refuse after
    loading a 6.7B model is refused in milliseconds by the worker and the CLI.
    """
    problems: list[tuple[tuple[str, ...], str]] = []
    t, d = cfg.training, cfg.distributed
    if t.num_epochs is not None and "max_steps" in t.model_fields_set:
        problems.append((("training", "num_epochs"), "give max_steps or num_epochs, not both (over a preset "
                         "that sets max_steps, add training.max_steps: null)"))
    if not cfg.lora.enabled and cfg.quantization.mode == "nf4":
        problems.append((("lora", "enabled"), "false with quantization.mode nf4 leaves no trainable parameters "
                         "(4-bit weights are frozen); enable LoRA (QLoRA) or set quantization.mode: none"))
    world = d.nproc * d.nnodes
    if t.grad_accum_steps % world:
        problems.append((("training", "grad_accum_steps"), f"{t.grad_accum_steps} must be divisible by "
                         f"distributed.nproc x distributed.nnodes ({world}): the global batch is "
                         "micro_batch_size * grad_accum_steps whatever the number of processes"))
    problems.extend(_rl_problems(cfg))
    if d.backend == "deepspeed" and deepspeed_zero_stage(d.deepspeed_config) == 3:
        if cfg.output.merge:
            problems.append((("output", "merge"), "not with ZeRO-3 (weights are sharded); merge the saved "
                             "adapter afterwards with peft's merge_and_unload"))
        if cfg.quantization.mode != "none":
            problems.append((("quantization", "mode"), "4-bit weights cannot be sharded by ZeRO-3; use "
                             "configs/deepspeed/zero2.json or distributed.backend: ddp"))
    return problems


def _rl_problems(cfg: Config) -> list[tuple[tuple[str, ...], str]]:
    """The RL stage's checks across sections (docs/rl.md)."""
    out: list[tuple[tuple[str, ...], str]] = []
    if cfg.stage != "rl":
        if cfg.rl != RLConfig():
            out.append((("rl",), "set, but stage is sft; set stage: rl or remove the rl section"))
        return out
    d, r = cfg.distributed, cfg.rl
    world = d.nproc * d.nnodes
    if d.backend == "deepspeed":
        out.append((("distributed", "backend"), "stage rl does not run under DeepSpeed: generation needs the "
                    "whole weights on every rank and the update steps the torch optimizer over the LoRA "
                    "parameters, which are too small for ZeRO's sharding to save memory; use distributed."
                    "backend: ddp (or auto) with distributed.nproc 2, and quantization.mode: nf4 for a model "
                    "too big for one GPU in 16-bit (docs/rl.md)"))
    if r.prompts_per_step % world:
        out.append((("rl", "prompts_per_step"), f"{r.prompts_per_step} must be divisible by distributed.nproc x "
                    f"distributed.nnodes ({world}): each process generates for an equal share of the prompts, "
                    "and a prompt's whole group stays on one process"))
    if not cfg.lora.enabled:
        out.append((("lora", "enabled"), "stage rl needs LoRA: the reference policy is the model with the "
                    "adapter disabled"))
    if not cfg.rl.rewards:
        out.append((("rl", "rewards"), "at least one reward function is needed"))
    if cfg.rl.rewards and not any(r.weight for r in cfg.rl.rewards):
        out.append((("rl", "rewards"), "every weight is 0: the reward would be constant"))
    rows = max(1, r.prompts_per_step // world) * r.num_generations
    if cfg.training.micro_batch_size > rows:
        out.append((("training", "micro_batch_size"), f"{cfg.training.micro_batch_size} is more than the "
                    f"{rows} completions of a generation batch on one process "
                    "(rl.prompts_per_step / processes x rl.num_generations)"))
    return out


class Config(_Section):
    name: str = "run"
    stage: Literal["sft", "rl"] = Field("sft", exclude_if=lambda v: v == "sft")
    """`sft` (supervised fine-tuning, the default) or `rl` (GRPO on rewards, docs/rl.md)."""
    strategy: Literal["local", "kaggle", "sagemaker", "hybrid"] = "local"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # left out of the dump for SFT runs, so their config_hash stays what it was
    rl: RLConfig = Field(default_factory=RLConfig, exclude_if=lambda v: v == RLConfig())
    cloud: dict[str, Any] = Field(default_factory=dict)
    """Backend settings (budgets, buckets, kernels); validated by uff_port.cloud."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _check_sections_together(self) -> Config:
        problems = cross_section_problems(self)
        if problems:
            raise ValidationError.from_exception_data(
                "Config",
                [
                    InitErrorDetails(type=PydanticCustomError("cross_section", "{message}", {"message": message}), loc=loc, input=None)
                    for loc, message in problems
                ],
            )
        return self


# Sections that may change between a checkpoint and its resume without changing
# what is being learned: more steps, another budget, other hardware.
_RESUME_NEUTRAL: Final = {
    "name": None,
    "strategy": None,
    # The limit only decides which oversized lines are skipped from here on; binding
    # checkpoints to it would strand every run started before the key existed.
    "data": {"max_line_bytes", "max_bad_line_fraction"},
    "rl": {"reward_workers"},
    "training": {
        "max_steps", "num_epochs", "max_runtime", "progress_every_seconds", "device", "cpu_threads",
        # Raised after a `non_finite` failure to resume past a bad batch.
        "skip_nonfinite_steps",
        # The same loss within float rounding (docs/memory.md); memory, not what is learned.
        "loss",
        # Which kernels, not what is learned: a resume may turn it on to compare bits.
        "deterministic",
    },
    "model": {"offload_activations"},
    "checkpoint": None,
    "distributed": None,
    "eval": None,
    "output": None,
    "cloud": None,
}


_BOUND_WHEN_SET: Final = {"data": {"chat_template"}, "model": {"init_adapter"}}
"""Keys that bind a checkpoint only when set (they did not exist when older runs started)."""

CHAT_TEMPLATES: Final[dict[str, str]] = {
    # DeepSeek-Coder instruct's own format, with the tokenizer's eos ending each reply, so a base
    # model's tokenizer (which ships no template) learns the instruct model's turn-taking.
    "deepseek-coder": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + '\\n' + eos_token + '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # The widespread ChatML turns (<|im_start|>role ... <|im_end|>).
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
"""Named values of `data.chat_template`."""


def did_you_mean(word: str, choices: Any) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_loc(loc: tuple[Any, ...]) -> str:
    return dotted(loc)


_TYPE_NAMES: Final = {
    bool: "boolean", int: "integer", float: "number", str: "string", dict: "map", list: "list", type(None): "null",
}  # fmt: skip
_EXPECTED: Final = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a map",
    "model_type": "a map",
}


def friendly_error(err: Any) -> str:
    """One pydantic error as a short phrase ('must be > 0'); shared by every config schema."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "less_than":
        return f"must be < {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in _EXPECTED:  # the type of what came, never the value (it may come from any file)
        got = err.get("input")
        return f"expected {_EXPECTED[kind]}, got {_TYPE_NAMES.get(type(got), type(got).__name__)}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}"
    if kind == "missing":
        return "required"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError([f"{key}: override key must be dotted names like 'training.max_steps'"])
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"{key}: '{part}' is not a section"])
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides (`{"training.max_steps": 40}`) applied."""
    out = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise ConfigError([f"{key!r}: override keys must be strings"])
        _set_dotted(out, key, value)
    return out


def validate_config(raw: Any, overrides: dict[str, Any] | None = None) -> Config:
    """Validate a config map (plus overrides); raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: config must be a map, got {type(raw).__name__}"])
    # Bounded walks first: a 900-deep or alias-expanded tree is refused by name
    # before deepcopy, pydantic or json recurse into it; overrides can deepen it.
    try:
        check_tree(raw)
        merged = apply_overrides(raw, overrides)
        check_tree(merged)
    except ConfigLimitError as exc:
        raise ConfigError([exc.problem]) from None
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError([f"{_format_loc(e['loc'])}: {friendly_error(e)}{_key_hint(e)}" for e in exc.errors()]) from None


def _key_hint(err: Any) -> str:
    """"did you mean" for an unknown key: the closest key of the section it was found in."""
    if err.get("type") != "extra_forbidden":
        return ""
    model: Any = Config
    for part in err["loc"][:-1]:
        info = getattr(model, "model_fields", {}).get(part)
        model = getattr(info, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    return did_you_mean(str(err["loc"][-1]), model.model_fields)


def _exists(p: Path, *, regular: bool = False) -> bool:
    try:
        st = os.stat(p)
    except (OSError, ValueError):  # ValueError: a NUL in the name; OSError: too long, no access
        return False
    return not regular or stat.S_ISREG(st.st_mode)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON config within the limits of config_io; `tiny` or `tiny.yaml` also finds a preset.

    Errors name the file, a line and key paths, never its contents.
    """
    p = Path(path)
    if not _exists(p):
        # Preset names may contain dots (`deepseek-coder-6.7b-...`): try the name as given, then + .yaml.
        found = [c for c in (PRESETS_DIR / p.name, PRESETS_DIR / f"{p.name}.yaml") if _exists(c, regular=True)]
        if not found:
            presets = training_presets()
            raise ConfigError([f"config_path: no such file {str(path)!r}{did_you_mean(p.name.removesuffix('.yaml'), presets)} "
                               f"(presets: {', '.join(presets)})"])
        p = found[0]
    try:
        data = parse_config_text(read_config_bytes(p), name=str(p), as_json=p.suffix.lower() == ".json")
    except ConfigLimitError as exc:
        raise ConfigError([exc.problem]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"config_path: {p} must hold a map, got {type(data).__name__}"])
    return data


NOT_TRAINING_PRESETS: Final = frozenset({"gates"})
"""Files among the presets that are not training configs (`gates.yaml`: promotion gates)."""


def training_presets() -> list[str]:
    """Names of the bundled training configs (what `uff-port train NAME` takes)."""
    return sorted(c.stem for c in PRESETS_DIR.glob("*.yaml") if c.stem not in NOT_TRAINING_PRESETS)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    return validate_config(load_config_file(path), overrides)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def config_hash(cfg: Config) -> str:
    """sha256 of the whole resolved config."""
    return hashlib.sha256(_canonical(cfg.to_dict())).hexdigest()


def resume_view(cfg: Config) -> dict[str, Any]:
    """The part of the config a checkpoint is bound to (what is being learned)."""
    full = cfg.to_dict()
    out: dict[str, Any] = {}
    for key, value in full.items():
        if key in _RESUME_NEUTRAL and _RESUME_NEUTRAL[key] is None:
            continue
        neutral = _RESUME_NEUTRAL.get(key)
        if isinstance(value, dict) and neutral:
            value = {k: v for k, v in value.items() if k not in neutral}
        if isinstance(value, dict) and key in _BOUND_WHEN_SET:
            # Keys added later: unset, they change nothing, so older checkpoints still resume.
            value = {k: v for k, v in value.items() if not (k in _BOUND_WHEN_SET[key] and v is None)}
        out[key] = value
    return out


def resume_hash(cfg: Config) -> str:
    """sha256 of `resume_view`: equal hashes mean a checkpoint may be resumed."""
    return hashlib.sha256(_canonical(resume_view(cfg))).hexdigest()


def diff_views(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two config views (for clear refusals)."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_views(va, vb, path + "."))
        elif va != vb:
            out.append(f"{path}: {va!r} -> {vb!r}")
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def data_path_problems(cfg: Config) -> list[str]:
    """data.path / eval.path files that are missing or not files, found without reading them.

    Checked by the CLI and the worker before a run directory exists, so a typo in a
    path costs milliseconds, not a model load. `builtin:` names are the trainer's.
    """
    raw = [cfg.data.path] if isinstance(cfg.data.path, str) else list(cfg.data.path)
    named = [("data.path", p) for p in raw] + ([("eval.path", cfg.eval.path)] if cfg.eval.path else [])
    out = []
    for key, name in named:
        if name.startswith("builtin:"):
            continue
        path = Path(name).expanduser()
        if _exists(path) and not _exists(path, regular=True):
            out.append(f"{key}: {name!r} is not a regular file (a directory?), expected a JSONL file")
        elif not _exists(path):
            try:
                siblings = os.listdir(path.parent)
            except (OSError, ValueError):
                siblings = []
            near = did_you_mean(path.name, siblings) if len(siblings) < 10_000 else ""
            out.append(f"{key}: no such file {name!r}{near}")
    return out
