"""Build DeepSeek-Coder 1.3B / 6.7B with the real config and random weights, once per cache.

    flock /tmp/uff-bigmem.lock python scripts/build_real_arch.py 1.3b [--device cuda] [--root DIR]
    python scripts/build_real_arch.py 6.7b --meta     # no weights: exact counts, peft's and the planner's

Prints the model directory (under $UFF_PORT_CACHE unless --root): config.json,
bf16 safetensors and a 32256-entry tokenizer, loadable by `from_pretrained` like
a hub checkout. 1.3B needs ~2.7 GB of RAM and disk, 6.7B ~13.5 GB (build it with
--device cuda on a GPU machine: the initializer runs there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uff_port.training.real_arch import REAL_CONFIGS, ensure_real_arch, meta_model  # noqa: E402


def meta_counts(size: str, r: int) -> dict[str, int | bool]:
    """Parameters and LoRA parameters on the meta device (peft) against the planner's arithmetic."""
    from uff_port.planner.arch import BUILTIN, DEFAULT_TARGETS

    model = meta_model(size, lora_r=r, targets=DEFAULT_TARGETS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    arch = BUILTIN[f"deepseek-coder-{size}"]
    planned = (arch.n_params, arch.lora_params(r, DEFAULT_TARGETS))
    return {"params": frozen, "lora_params": trainable, "planner_params": planned[0],
            "planner_lora_params": planned[1], "equal": (frozen, trainable) == planned}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=sorted(REAL_CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--meta", action="store_true", help="count on the meta device; build nothing")
    ap.add_argument("--lora-r", type=int, default=16)
    a = ap.parse_args()
    if a.meta:
        import json

        counts = meta_counts(a.size, a.lora_r)
        print(json.dumps({"size": a.size, "lora_r": a.lora_r, **counts}))
        return 0 if counts["equal"] else 1
    t0 = time.monotonic()
    path = ensure_real_arch(a.size, a.root, device=a.device)
    print(f"built {a.size} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
