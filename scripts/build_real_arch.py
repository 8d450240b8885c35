"""Build DeepSeek-Coder 1.3B / 6.7B with the real config and random weights, once per cache.

    flock /tmp/uff-bigmem.lock python scripts/build_real_arch.py 1.3b [--device cuda] [--root DIR]

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

from uff_port.training.real_arch import REAL_CONFIGS, ensure_real_arch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=sorted(REAL_CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.monotonic()
    path = ensure_real_arch(a.size, a.root, device=a.device)
    print(f"built {a.size} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
