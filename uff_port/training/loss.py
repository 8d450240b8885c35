"""Next-token cross-entropy without the `[tokens, vocab]` logits tensor.

DeepSeek-Coder's vocabulary is 32,256 tokens: at 4 x 2048 tokens the logits
alone are 1 GiB in fp32, and HF's loss keeps them, their fp32 log-softmax and
the gradients of both alive at the start of backward (docs/memory.md). The
chunked loss never builds them:

* the model runs with `logits_to_keep` empty (its lm_head projects nothing)
  and the final hidden states are taken from the decoder by a forward hook,
  so the call still goes through every wrapper (PEFT, DDP, DeepSpeed);
* only target tokens (labels != -100) are projected: a prompt, a chat's user
  turns and the padding are never multiplied by the vocabulary;
* `FusedLinearCE` projects a chunk of tokens at a time in the compute dtype,
  takes an fp32 log-sum-exp, and computes that chunk's gradient (softmax minus
  one-hot, back through the head) at once, as Liger's fused linear
  cross-entropy does: no logits survive a chunk, nothing is recomputed in
  backward, and the FLOPs are those of the unchunked loss;
* an lm_head that is not a plain Linear (e.g. one with a LoRA adapter) is run
  chunk by chunk under `torch.utils.checkpoint` instead (its chunk's logits
  recomputed in backward).

The value is the same sum over target tokens as `full_loss_sum` (the engine
divides by the step's token count), so exact resume and the loss scale are
untouched. Measured agreement with the full loss: tests/test_training_loss.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE: Final = -100
LossMode = Literal["chunked", "full"]
MIN_CHUNK: Final = 128
"""Fewer rows than this make a chunk's matmul inefficient for little memory saved."""
CHUNK_LOGITS_BYTES: Final = 128 << 20
"""Upper bound of one chunk's fp32 logits: 1024 rows at DeepSeek-Coder's 32,256 tokens."""


def chunk_rows(n: int, vocab: int) -> int:
    """Tokens per chunk: a power of two near a quarter of the n tokens, within bounds.

    A quarter: the full loss keeps about four [n, vocab] fp32 buffers at its peak, a
    chunk two of [rows, vocab], so the loss part shrinks >= 4x at any n. Not smaller:
    on a CPU core a [128, 2048] x [2048, 32256] matmul runs at about half the speed of
    a [512, ...] one (measured), so rows grow with n up to CHUNK_LOGITS_BYTES.
    """
    cap = max(MIN_CHUNK, 1 << (max(1, CHUNK_LOGITS_BYTES // (4 * max(vocab, 1))).bit_length() - 1))
    want = 1 << (max(1, (max(n, 1) + 3) // 4) - 1).bit_length()
    return min(cap, max(MIN_CHUNK, want))


class FusedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W.T + b, y_i) over rows, its gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
        dtype: torch.dtype, rows: int, grads: bool,
    ) -> torch.Tensor:
        need_w = grads and weight.requires_grad
        need_b = grads and bias is not None and bias.requires_grad
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], rows):
                hc = h[start : start + rows].to(dtype)
                yc = target[start : start + rows]
                logits = hc @ w.T
                if b is not None:
                    logits += b
                # The reduction in fp32 (bf16 logits lose the small probabilities), in place over
                # one [rows, vocab] buffer: the chunk's only large tensor on fp32 (CPU).
                z = logits.float()
                del logits
                picked = z.gather(1, yc[:, None]).squeeze(1)
                top = z.amax(dim=1)
                z.sub_(top[:, None]).exp_()
                norm = z.sum(dim=1)
                total += (top + norm.log() - picked).sum()
                if grad_h is None:  # evaluation: the value only
                    continue
                # d(sum CE)/d logits = softmax - one_hot.
                z.div_(norm[:, None])
                z[torch.arange(z.shape[0], device=z.device), yc] -= 1.0
                g = z.to(dtype)
                del z
                grad_h[start : start + rows] = (g @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.T.float(), hc.float())
                if grad_b is not None:
                    grad_b += g.float().sum(0)
                del g  # else it outlives the next chunk's logits: two chunks alive at once
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.has = (grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        has_w, has_b = ctx.has
        scale = grad_out.to(torch.float32)
        gh = grad_h * scale.to(grad_h.dtype)
        gw = grad_w * scale if has_w else None
        gb = grad_b * scale if has_b else None
        return gh, gw, gb, None, None, None, None


def _checkpointed_ce(head: Any, h: torch.Tensor, target: torch.Tensor, rows: int, autocast: torch.dtype | None) -> torch.Tensor:
    """Any lm_head module, one checkpointed chunk at a time (its logits recomputed in backward)."""

    def part(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hc.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = head(hc)
        return F.cross_entropy(logits.float(), yc, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        total = total + checkpoint(part, h[start : start + rows], target[start : start + rows], use_reentrant=False)
    return total


def _unwrap(model: Any) -> Any:
    """The transformers model under DDP / DeepSpeed (`.module`) and PEFT (`get_base_model`)."""
    m = model
    while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def supports_chunked(model: Any) -> bool:
    """A causal LM whose logits are exactly lm_head(decoder output): no softcapping or scaling."""
    base = _unwrap(model)
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return callable(getattr(base, "get_decoder", None)) and base.get_output_embeddings() is not None


@contextmanager
def _final_hidden(base: Any) -> Iterator[list[torch.Tensor]]:
    """Capture the decoder's last_hidden_state while the model runs."""
    got: list[torch.Tensor] = []

    def hook(_m: Any, _i: Any, out: Any) -> None:
        got.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = base.get_decoder().register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


def chunked_ce_sum(head: Any, hidden: torch.Tensor, labels: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of CE over target rows of `hidden` ([n, h]) against `labels` ([n], -100 ignored)."""
    keep = labels != IGNORE
    idx = keep.nonzero().squeeze(1)
    h = hidden.index_select(0, idx)  # only targets are projected
    y = labels.index_select(0, idx)
    if h.shape[0] == 0:  # zero, with the graph kept (DDP expects every rank to backward)
        zero = hidden.sum() * 0.0
        for p in head.parameters():
            if p.requires_grad:
                zero = zero + p.sum() * 0.0
        return zero
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else int(getattr(head, "out_features", 0)) or 1
    rows = chunk_rows(h.shape[0], vocab)
    # ZeRO-3 partitions the weight outside the module's own call: go through the module then.
    if type(head) is torch.nn.Linear and weight is not None and not hasattr(weight, "ds_status"):
        dtype = autocast or weight.dtype
        grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        return FusedLinearCE.apply(h, weight, head.bias, y, dtype, rows, grads)  # type: ignore[no-any-return]
    return _checkpointed_ce(head, h, y, rows, autocast)


def chunked_loss_sum(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """`full_loss_sum` without materialising the logits (see the module doc)."""
    labels = batch.pop("labels")
    base = _unwrap(model)
    device_type = labels.device.type
    nothing = torch.empty(0, dtype=torch.long, device=labels.device)
    with _final_hidden(base) as got, torch.autocast(
        device_type, dtype=autocast or torch.float32, enabled=autocast is not None
    ):
        model(**batch, use_cache=False, logits_to_keep=nothing)
    hidden = got[-1]
    # Position t predicts label t + 1; the last position predicts nothing. No copy of hidden.
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    return chunked_ce_sum(base.get_output_embeddings(), hidden.flatten(0, 1), target.flatten(), autocast)


def full_loss_sum(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != -100), from the full logits."""
    labels = batch.pop("labels")
    device_type = labels.device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(**batch, use_cache=False).logits
    # fp32 for the softmax: bf16 logits lose the small probabilities.
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def loss_sum(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None,
             mode: LossMode = "chunked") -> torch.Tensor:
    """The training loss sum by `training.loss`; models the chunked path cannot see through use the full one."""
    if mode == "chunked" and supports_chunked(model):
        return chunked_loss_sum(model, batch, autocast)
    return full_loss_sum(model, batch, autocast)
