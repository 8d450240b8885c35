"""Peak memory of one training configuration, per GPU and on the host: pure arithmetic.

Every term is documented with its source in docs/memory.md. The activation
terms are an exact account of the tensors that HF Llama + PEFT save for
backward (checked tensor by tensor on CPU in tests/test_planner_measured.py);
the allocator and context terms are calibrated constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from uff_port.planner.arch import DEFAULT_TARGETS, Arch
from uff_port.planner.sizes import GiB, MiB

Method = Literal["full", "lora", "qlora"]
Strategy = Literal["single", "ddp", "zero2", "zero3", "zero3_offload"]
METHODS: Final[tuple[Method, ...]] = ("full", "lora", "qlora")
STRATEGIES: Final[tuple[Strategy, ...]] = ("single", "ddp", "zero2", "zero3", "zero3_offload")
DEEPSPEED: Final = frozenset({"zero2", "zero3", "zero3_offload"})

# NF4 (QLoRA paper, sec. 3): 4-bit codes + one absmax per 64-weight block; with
# double quantization the absmax is 8-bit with one fp32 constant per 256 blocks.
NF4_BLOCK: Final = 64
NF4_DQ_BLOCK: Final = 256
# Outside the caching allocator: CUDA context, cuBLAS/cuDNN handles, kernels.
CUDA_CONTEXT: Final = 512 * MiB
NCCL_BUFFERS: Final = 256 * MiB
# Caching allocator: blocks are rounded and split; reserved exceeds allocated.
FRAGMENTATION: Final = 0.10
CUBLAS_WORKSPACE: Final = 32 * MiB
# DeepSpeed defaults (reduce_bucket_size, stage3_prefetch_bucket_size), elements.
DS_REDUCE_BUCKET: Final = 500_000_000
DS_PREFETCH_BUCKET: Final = 50_000_000
# Host: resident size of one trainer process once torch/transformers/peft are imported.
PROCESS_RSS_GPU: Final = int(2.5 * GiB)
PROCESS_RSS_CPU: Final = int(1.0 * GiB)
# Backward working set in units of one layer's saved activations, measured on CPU
# with the PyTorch memory profiler (tests/test_planner_measured.py): 1.2-1.3 with
# checkpointing (the recomputed layer + its gradients; ~1.6 under autocast, whose
# gradients partly flow in fp32), 0.15-0.3 without.
BACKWARD_CKPT: Final = 1.3
BACKWARD_CKPT_AUTOCAST: Final = 1.6
BACKWARD_NO_CKPT: Final = 0.35
# Chunked loss (training/loss.py): bounds of a chunk.
CHUNK_MIN: Final = 128
CHUNK_LOGITS_BYTES: Final = 128 << 20
# Saved tensors offloaded to pinned host memory cost a PCIe round trip per step (torch's
# save_on_cpu copies synchronously). Unmeasured; by arithmetic (6.7B LoRA, 4 x 2048: ~55 GiB
# each way at ~25 GB/s against ~330 TFLOP of compute) 0.7 of the speed on a T4, 0.25 on an
# A100. 0.5 ranks it under checkpointing and QLoRA: recommended only where nothing else fits.
OFFLOAD_SPEED: Final = 0.5
# Loading through a device_map (the nf4 path) streams shard by shard.
SHARD_BYTES: Final = 5 * GiB


@dataclass(frozen=True)
class Candidate:
    """One way to train: what is trained, how it is spread, and the per-step shape."""

    method: Method
    strategy: Strategy
    nproc: int
    grad_ckpt: bool
    micro_batch: int
    ckpt_every: int = 1
    """With `grad_ckpt`: 1 checkpoints every decoder layer, 2 every other one (`every_other`)."""
    offload: bool = False
    """`model.offload_activations`: what autograd saves waits in host memory (CUDA only)."""

    @property
    def ckpt_mode(self) -> bool | str:
        """The value of `model.gradient_checkpointing` that selects this candidate."""
        return "every_other" if self.grad_ckpt and self.ckpt_every == 2 else self.grad_ckpt

    @property
    def label(self) -> str:
        ck = ("ckpt/2" if self.ckpt_every == 2 else "ckpt") if self.grad_ckpt else "no-ckpt"
        return f"{self.method}/{self.strategy}x{self.nproc}/{ck}{'+offload' if self.offload else ''}/mb{self.micro_batch}"


@dataclass(frozen=True)
class Workload:
    """What the search does not vary: sequence shape, adapter shape, device and dtype."""

    seq_len: int
    device: Literal["cuda", "cpu"] = "cuda"
    compute_bytes: int = 2
    """2: bf16/fp16 base weights and autocast (GPU); 4: fp32 throughout (CPU default)."""
    lora_r: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.05
    attn: str = "sdpa"
    double_quant: bool = True
    ds_reduce_bucket: int = DS_REDUCE_BUCKET
    """DeepSpeed `reduce_bucket_size` (elements) of the config in use."""
    loss: Literal["chunked", "full"] = "chunked"
    """`training.loss`: chunked never holds the [tokens, vocab] logits (training/loss.py)."""
    packing: bool = True
    """Packed rows: SDPA/eager get a block-diagonal [mb, 1, s, s] mask; flash attention none."""
    rollout_rows: int = 0
    """RL stage: completions generated at once (prompts_per_step x num_generations); 0 = SFT."""
    rollout_len: int = 0
    """RL stage: prompt + completion tokens of one row (the KV cache's length)."""


@dataclass
class Estimate:
    """Peak bytes per GPU (`gpu`) and on the host for all ranks together (`cpu`)."""

    candidate: Candidate
    gpu: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def reserved(self) -> int:
        """What `torch.cuda.max_memory_reserved` should read: all but the context."""
        return self.gpu_total - self.gpu.get("cuda_context", 0)

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


def nf4_bytes_per_param(double_quant: bool) -> float:
    """0.5 byte of code + quantization constants (4.127 bits/param with double quant)."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DQ_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


def _lora_input_bytes(arch: Arch, wl: Workload) -> float:
    """Per token per layer: what each adapter keeps of its input for backward."""
    shapes = arch.linear_shapes()
    targets = [t for t in dict.fromkeys(wl.lora_targets) if t in shapes]
    autocast = wl.compute_bytes < 4
    cast = 2 if autocast else 4  # autocast saves a bf16 copy; fp32 keeps the fp32 input
    if wl.lora_dropout > 0:
        # CUDA's fused dropout keeps a 1-byte mask; the CPU path keeps a fp32 noise tensor.
        mask = 1 if wl.device == "cuda" else 4
        return sum((mask + cast) * shapes[t][0] for t in targets)
    if autocast or wl.compute_bytes != 4:
        return sum(cast * shapes[t][0] for t in targets)
    # fp32, no dropout: adapters share the base layer's input tensor (one per input).
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
    seen = {groups[t] for t in targets if t in groups}
    size = {"attn_in": arch.hidden, "mlp_in": arch.hidden, "down_in": arch.intermediate}
    return sum(4 * size[g] for g in seen)


def layer_activation_bytes(arch: Arch, method: Method, wl: Workload) -> float:
    """Bytes one decoder layer saves for backward, per token (no checkpointing)."""
    p = wl.compute_bytes
    h, i = arch.hidden, arch.intermediate
    # Two RMSNorms upcast to fp32 and keep that copy and 1/rms (HF LlamaRMSNorm).
    total: float = 2 * (4 * h + 4)
    # Attention keeps q, k, v (after RoPE) and its output.
    total += p * (2 * arch.q_dim + 2 * arch.kv_dim)
    if wl.attn == "eager":
        # softmax output in fp32 plus its cast to the compute dtype, per head per key.
        total += arch.heads * wl.seq_len * (4 + (p if p != 4 else 0))
    else:
        total += 4 * arch.heads  # flash / memory-efficient SDPA: log-sum-exp only
    # SwiGLU: silu input, silu output and up output.
    total += 3 * p * i
    if method == "full":
        # Trainable weights need their inputs: both norm outputs, the norm-weight products
        # and down_proj's input (o_proj's input is the attention output, already kept).
        total += p * (4 * h + i)
    else:
        shapes = arch.linear_shapes()
        n_targets = sum(1 for t in dict.fromkeys(wl.lora_targets) if t in shapes)
        total += _lora_input_bytes(arch, wl)
        total += n_targets * wl.lora_r * (2 if p < 4 else 4)  # lora_A output kept by lora_B
    return total


def layer_constant_bytes(arch: Arch, method: Method, wl: Workload) -> float:
    """Per layer, independent of tokens: autocast's bf16 copies of the fp32 adapter weights."""
    if method == "full" or wl.compute_bytes >= 4:
        return 0.0
    return 2.0 * arch.lora_params(wl.lora_r, wl.lora_targets) / arch.layers


def activation_bytes(arch: Arch, cand: Candidate, wl: Workload) -> dict[str, float]:
    """Saved activations of the whole model and the backward transient, per micro-batch."""
    tokens = cand.micro_batch * wl.seq_len
    p = wl.compute_bytes
    layer = layer_activation_bytes(arch, cand.method, wl) * tokens
    layer += layer_constant_bytes(arch, cand.method, wl)
    # Final norm (fp32 copy + 1/rms); a trainable head also keeps its input.
    tail = tokens * (4 * arch.hidden + 4 + (2 * p * arch.hidden if cand.method == "full" else 0))
    if cand.grad_ckpt:
        # Only each layer's input survives the forward; backward recomputes one layer
        # at a time and holds it together with the gradients flowing through it.
        # QLoRA's fp32 embeddings (prepare_model_for_kbit_training) make the residual fp32.
        resid = 4 if cand.method == "qlora" else p
        saved: float = arch.layers * tokens * resid * arch.hidden + tail
        transient = (BACKWARD_CKPT_AUTOCAST if p < 4 else BACKWARD_CKPT) * layer
    else:
        # Backward frees each layer's saved tensors as it goes: only the gradients in
        # flight through one layer come on top.
        saved = arch.layers * layer + tail
        transient = BACKWARD_NO_CKPT * layer
    if cand.grad_ckpt and cand.ckpt_every == 2:
        # Even layers keep only their input, odd ones everything they save.
        kept = arch.layers // 2
        saved += kept * (layer - tokens * resid * arch.hidden)
    if wl.packing and not wl.attn.startswith("flash"):
        # transformers' block-diagonal mask for packed rows: bool for SDPA, additive in p for eager.
        saved += cand.micro_batch * wl.seq_len**2 * (1 if wl.attn == "sdpa" else p)
    # What checkpoints hold (each checkpointed layer's input) stays on the GPU under offload:
    # torch's non-reentrant checkpoint keeps it in its recompute closure, not as a saved tensor.
    n_ckpt = 0 if not cand.grad_ckpt else arch.layers - (arch.layers // 2 if cand.ckpt_every == 2 else 0)
    pinned = n_ckpt * tokens * (4 if cand.method == "qlora" else p) * arch.hidden
    return {"saved": saved, "transient": transient, "logits": loss_bytes(arch, tokens, wl),
            "ckpt_inputs": float(pinned)}


def chunk_rows(n: int, vocab: int) -> int:
    """Tokens per chunk of the chunked loss: the rule of `training.loss.chunk_rows` (torch-free copy)."""
    cap = max(CHUNK_MIN, 1 << (max(1, CHUNK_LOGITS_BYTES // (4 * max(vocab, 1))).bit_length() - 1))
    want = 1 << (max(1, (max(n, 1) + 3) // 4) - 1).bit_length()
    return min(cap, max(CHUNK_MIN, want))


def loss_bytes(arch: Arch, tokens: int, wl: Workload) -> float:
    """The loss's own peak on top of the activations, per micro-batch."""
    p = wl.compute_bytes
    if wl.loss == "full":
        # Logits in the compute dtype (held by the output), the fp32 log-softmax kept by
        # cross-entropy, and in backward its fp32 gradient in and out (HF ForCausalLMLoss
        # upcasts logits to fp32).
        return float(tokens * arch.vocab * (p + 12))
    # Chunked: the targets' hidden states and their gradient (both [tokens, h] in p), and
    # one chunk's fp32 logits, turned into the softmax gradient in place; under autocast
    # also the p-byte logits it came from, or its p-byte cast (one at a time).
    rows = min(chunk_rows(tokens, arch.vocab), tokens)
    return float(2 * tokens * arch.hidden * p + rows * arch.vocab * (4 + (p if p < 4 else 0)))


def _param_split(arch: Arch, cand: Candidate, wl: Workload) -> tuple[int, int]:
    """(frozen or trainable base params, adapter params)."""
    if cand.method == "full":
        return arch.n_params, 0
    return arch.n_params, arch.lora_params(wl.lora_r, wl.lora_targets)


def _base_weight_bytes(arch: Arch, cand: Candidate, wl: Workload) -> float:
    p = wl.compute_bytes
    if cand.method != "qlora":
        return arch.n_params * p
    quantized = arch.layers * arch.layer_linear_params
    # prepare_model_for_kbit_training upcasts everything not quantized to fp32.
    rest = arch.n_params - quantized
    return quantized * nf4_bytes_per_param(wl.double_quant) + rest * 4


def estimate(arch: Arch, cand: Candidate, wl: Workload) -> Estimate:
    """Peak memory of `cand` training `arch` under `wl`; see docs/memory.md."""
    n = cand.nproc
    p = wl.compute_bytes
    _, n_lora = _param_split(arch, cand, wl)
    base = _base_weight_bytes(arch, cand, wl)
    ds = cand.strategy in DEEPSPEED
    if cand.method == "full":
        n_train = arch.n_params
        # DeepSpeed keeps bf16 params/grads and fp32 master + Adam m, v (ZeRO paper, K=12);
        # plain torch AdamW keeps m, v in the parameters' dtype.
        train_param: float = 0.0
        grad: float = n_train * (2 if ds else p)
        optim: float = n_train * (12 if ds else 2 * p)
    else:
        n_train = n_lora
        train_param = n_train * (2 if ds else 4)
        grad, optim = n_train * (2 if ds else 4), n_train * (12 if ds else 8)
    acts = activation_bytes(arch, cand, wl)

    gathered: float = 2 * (max(arch.layer_params, arch.embed_params) + DS_PREFETCH_BUCKET)
    bucket = min(grad, 2 * wl.ds_reduce_bucket)
    comm = 0.0
    if cand.strategy == "ddp":
        comm = grad  # DDP's flat gradient buckets are a second copy of the gradients
    elif cand.strategy == "zero2":
        grad, optim = grad / n + bucket, optim / n
    elif cand.strategy == "zero3":
        base, train_param = base / n + gathered, train_param / n
        grad, optim = grad / n + bucket, optim / n
    elif cand.strategy == "zero3_offload":
        base, train_param, grad, optim = gathered, 0.0, bucket, 0.0

    # Peak is at the start of backward (all activations + the loss buffers) or in the
    # backward of one layer, whichever is larger; the optimizer step's temporaries
    # (foreach AdamW, about one copy of the trained params) come after activations are freed.
    step_temp = train_param if cand.method != "full" else (base if not ds else 0.0)
    logits_part = acts["logits"]
    offloaded = acts["saved"] - acts["ckpt_inputs"] if cand.offload and wl.device == "cuda" else 0.0
    acts_part = acts["saved"] - offloaded + max(acts["transient"] - logits_part, 0.0)
    acts_part = max(acts_part, step_temp - logits_part)
    dynamic = acts_part + logits_part
    dequant = 0.0
    if cand.method == "qlora":
        biggest = max(a * b for a, b in arch.linear_shapes().values())
        dequant = 2 * biggest * 2  # one weight dequantized to bf16, and its use in backward
    gpu = {
        "weights": int(base),
        "trainable_params": int(train_param),
        "gradients": int(grad),
        "optimizer": int(optim),
        "activations": int(acts_part),
        "logits": int(logits_part),
        "overhead": int(FRAGMENTATION * (dynamic + grad) + CUBLAS_WORKSPACE + comm + dequant),
        "cuda_context": CUDA_CONTEXT + (NCCL_BUFFERS if n > 1 else 0),
    }
    if wl.rollout_rows:
        # RL generation (docs/rl.md): the KV cache of every row at full length, plus one
        # step's fp32 logits and their softmax. It lives while no activations do, so only
        # what it needs beyond the update's dynamic part is added.
        kv = 2 * arch.layers * arch.kv_dim * p * wl.rollout_rows * wl.rollout_len
        gen = kv + 2 * 4 * wl.rollout_rows * arch.vocab
        gpu["rollout_kv_cache"] = int(max(0.0, gen - dynamic))
    if wl.device == "cpu":
        gpu = {}
    host = _host(arch, cand, wl, n_train, base, gpu_state=(train_param, grad, optim, dynamic))
    if offloaded:
        host["offloaded_activations"] = int(n * offloaded)  # pinned, every rank's
    return Estimate(cand, gpu=gpu, cpu=host)


def _host(arch: Arch, cand: Candidate, wl: Workload, n_train: int, base: float,
          gpu_state: tuple[float, float, float, float]) -> dict[str, int]:
    n = cand.nproc
    if wl.device == "cpu":
        train_param, grad, optim, dynamic = gpu_state
        return {
            "process": PROCESS_RSS_CPU,
            "weights": int(base),
            "trainable_state": int(train_param + grad + optim),
            "activations": int(dynamic),
        }
    # from_pretrained builds the model on the host before `.to(device)`, in every rank;
    # the nf4 path quantizes onto the GPU shard by shard.
    full_copy = arch.n_params * wl.compute_bytes
    load = min(full_copy, SHARD_BYTES) if cand.method == "qlora" else full_copy
    offload = 0
    if cand.strategy == "zero3_offload":
        # ZeRO-Offload/Infinity: bf16 params (all ranks' partitions add up to one copy),
        # fp32 master + Adam m, v and fp32 gradients for what is trained.
        offload = int(2 * arch.n_params + 16 * n_train)
    return {
        "process": n * PROCESS_RSS_GPU,
        "model_load": int(n * load) if not offload else 0,
        "offload": max(offload, int(n * load)) if offload else 0,
    }


def speed_score(cand: Candidate) -> float:
    """Relative tokens/s, for ranking only (documented in docs/memory.md)."""
    strategy = {"single": 1.0, "ddp": 0.9, "zero2": 0.85, "zero3": 0.7, "zero3_offload": 0.3}
    method = {"lora": 1.0, "qlora": 0.7, "full": 0.65}
    # One more forward per step (~ +33% compute) for the checkpointed layers.
    ckpt = (0.75 if cand.ckpt_every == 1 else 0.86) if cand.grad_ckpt else 1.0
    ckpt *= OFFLOAD_SPEED if cand.offload else 1.0
    mb = 1.0 - 0.2 / cand.micro_batch  # small batches leave the GPU under-used
    return cand.nproc * strategy[cand.strategy] * method[cand.method] * ckpt * mb
