#!/usr/bin/env python3
"""Cost of the bounded config loader against the plain one it replaced.

Loads every preset in configs/ (gates.yaml aside) with the old path,
`yaml.safe_load(path.read_text())`, and with the new `load_config_file`
(size-capped read, libyaml composition, alias/depth/size walk, tree check),
in interleaved rounds whose order alternates, so machine noise hits both
alike. A second pair times validation: `Config.model_validate` on a deep copy
(what validate_config did before the tree walks) against `validate_config`.

    python scripts/bench_config.py [--rounds 15] [--loads 40]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uff_port.training.config import CONFIGS_DIR, Config, load_config_file, validate_config  # noqa: E402


def old_load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def old_validate(raw: dict[str, Any]) -> Any:
    return Config.model_validate(copy.deepcopy(raw))


def _time(fn: Callable[[Any], Any], items: list[Any], loads: int) -> float:
    start = time.perf_counter()
    for _ in range(loads):
        for item in items:
            fn(item)
    return (time.perf_counter() - start) / (loads * len(items))


def compare(name: str, old: Callable[[Any], Any], new: Callable[[Any], Any], items: list[Any], rounds: int,
            loads: int) -> dict[str, Any]:
    old_s: list[float] = []
    new_s: list[float] = []
    for r in range(rounds):
        pair = [(old, old_s), (new, new_s)]
        for fn, out in pair if r % 2 == 0 else reversed(pair):
            out.append(_time(fn, items, loads))
    ratios = sorted(n / o for n, o in zip(new_s, old_s, strict=True))
    return {
        "name": name,
        "old_us": statistics.median(old_s) * 1e6,
        "new_us": statistics.median(new_s) * 1e6,
        "ratio": statistics.median(ratios),
        "lo": ratios[0],
        "hi": ratios[-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--loads", type=int, default=40, help="loads of every preset per round and loader")
    args = ap.parse_args()
    presets = sorted(p for p in CONFIGS_DIR.glob("*.yaml") if p.name != "gates.yaml")
    for p in presets:  # same trees from both loaders, or the comparison means nothing
        assert old_load(p) == load_config_file(p), p
    raws = [load_config_file(p) for p in presets]
    rows = [
        compare("parse (file -> tree)", old_load, load_config_file, presets, args.rounds, args.loads),
        compare("validate (tree -> Config)", old_validate, validate_config, raws, args.rounds, args.loads),
    ]
    print(f"{len(presets)} presets, {args.rounds} interleaved rounds x {args.loads} loads each; "
          f"libyaml: {yaml.__with_libyaml__}")
    print("| step | old µs/config | new µs/config | new/old median | spread (min-max) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['old_us']:.0f} | {r['new_us']:.0f} | **{r['ratio']:.2f}x** | "
              f"{r['lo']:.2f}-{r['hi']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
