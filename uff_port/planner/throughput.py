"""Hours per epoch from a throughput model: an estimate until measured GPU figures exist.

One scale with the planner's ranking: `estimate.speed_score` is tokens/s
relative to one GPU training plain LoRA without checkpointing (4N FLOPs per
token: forward 2N, backward through the activations 2N), so

    tokens/s = speed_score(candidate) * TFLOPS * utilisation / (4 * N)

and the candidate the planner ranks fastest is the one estimated fastest here.
TFLOPS is the GPU's dense fp16/bf16 datasheet figure; the utilisation is an
assumption (0.3: LoRA fine-tuning at modest batch sizes, as the cloud presets
assume). Neither is a measurement: every figure is labelled an estimate.

One measurement so far (docs/real-size.md): 1.3B LoRA, sequence 2048,
micro-batch 4, checkpointing, on an H200 ran 11,797 tokens/s, a utilisation of
0.09 on this scale; a small model leaves a big GPU idle, so read the estimate
as a lower bound on the hours there. No 16 GB card has been measured.
"""

from __future__ import annotations

from typing import Any, Final

from uff_port.planner.estimate import Candidate, speed_score

DEFAULT_TFLOPS: Final = 65.0
"""Dense fp16 tensor TFLOPS of a 16 GB-class GPU (Tesla T4 datasheet); pass --tflops for yours."""
DEFAULT_UTILISATION: Final = 0.3
CPU_TFLOPS: Final = 0.05
"""A few CPU cores in fp32 (order of magnitude only)."""
LABEL: Final = ("estimate (datasheet TFLOPS x assumed utilisation 0.3; the one GPU measurement, "
                "1.3B on an H200, reached 0.09: hours there were 3x these)")


def tokens_per_second(n_params: int, cand: Candidate, tflops: float = DEFAULT_TFLOPS,
                      utilisation: float = DEFAULT_UTILISATION) -> float:
    return speed_score(cand) * tflops * 1e12 * utilisation / (4.0 * n_params)


def epoch_estimate(n_params: int, cand: Candidate, tokens: int | None, tflops: float = DEFAULT_TFLOPS,
                   utilisation: float = DEFAULT_UTILISATION) -> dict[str, Any]:
    """tokens/s, hours per epoch of `tokens` (None when unknown) and per 10M tokens, labelled."""
    tps = tokens_per_second(n_params, cand, tflops, utilisation)
    return {
        "candidate": cand.label,
        "tokens_per_s": round(tps, 1),
        "hours_per_epoch": round(tokens / tps / 3600.0, 4) if tokens else None,
        "corpus_tokens": tokens,
        "hours_per_10m_tokens": round(10_000_000 / tps / 3600.0, 4),
        "tflops": tflops,
        "utilisation": utilisation,
        "label": LABEL,
    }
