"""`uff-port data inspect PATH`: what a corpus holds and how long an epoch of it is, before training.

The same pass the trainer makes before its model loads (`data.scan_corpus`):
the tokenizer of the config's model, its split, filters, formats, truncation
and packing. Only the tokenizer is loaded, never the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from uff_port.core.exits import ExitCode


def register(subparsers: Any) -> None:
    d = subparsers.add_parser("data", help="inspect a training corpus (records, tokens, steps per epoch)")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    i = dsub.add_parser("inspect", help="records, tokens, formats, bad lines, managers, stages, steps per epoch")
    i.add_argument("path", nargs="+", help="JSONL file(s); replaces the config's data.path")
    i.add_argument("--config", default="tiny", help="YAML file or preset: its tokenizer, data and batch settings")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--json", action="store_true", help="print the findings as JSON")
    i.set_defaults(func=cmd_inspect)
    d.set_defaults(func=lambda _a: (d.print_help(sys.stderr), 2)[1])


def inspect(paths: list[str], config: str, overrides: list[str]) -> dict[str, Any]:
    """The scan's findings plus the steps and tokens of one epoch under `config`."""
    from uff_port.core.config import load_config
    from uff_port.training.__main__ import parse_overrides
    from uff_port.training.data import scan_corpus
    from uff_port.training.model import load_tokenizer

    cfg = load_config(config, {**parse_overrides(overrides), "data.path": paths[0] if len(paths) == 1 else paths})
    scan = scan_corpus(cfg.data.path, load_tokenizer(cfg), cfg.data)
    t = cfg.training
    per_epoch = scan.steps_per_epoch(t.micro_batch_size, t.grad_accum_steps)
    return {
        **scan.to_dict(),
        "config": config,
        "model": cfg.model.name_or_path,
        "seq_len": cfg.data.seq_len,
        "packing": cfg.data.packing,
        "global_batch": t.micro_batch_size * t.grad_accum_steps,
        "tokens_per_epoch": scan.train_sequences * cfg.data.seq_len if cfg.data.packing else scan.train_tokens,
        "steps_per_epoch": per_epoch,
        "max_steps": None if t.num_epochs is not None else t.max_steps,
        "epochs_of_max_steps": None if t.num_epochs is not None else round(t.max_steps / per_epoch, 3),
        "refusal": (err.message if (err := scan.refusal(cfg.data)) is not None else None),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from uff_port.core.config import ConfigError
    from uff_port.training.data import DataError
    from uff_port.training.model import ModelError

    try:
        info = inspect(args.path, args.config, args.overrides)
    except ConfigError as exc:
        print(f"failed (invalid_config): {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    except (DataError, ModelError) as exc:
        print(f"failed ({exc.code}): {exc.message}", file=sys.stderr)
        return ExitCode.REFUSED
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print(info)
    return ExitCode.REFUSED if info["refusal"] else 0


def _print(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    t = Table(title=f"{', '.join(info['files'])}  (tokenizer of {info['model']}, config {info['config']})",
              show_header=False)
    t.add_column(justify="left")
    t.add_column(justify="right")
    rows = [
        ("lines", f"{info['lines']:,}"),
        ("records (usable)", f"{info['records']:,}"),
        ("  train / eval", f"{info['train_records']:,} / {info['eval_records']:,}"),
        ("  left out by data.managers/stages", f"{info['filtered_out']:,}"),
        ("bad lines", f"{info['bad_lines']:,} ({info['bad_fraction']:.1%})"),
        ("train tokens (after truncation)", f"{info['train_tokens']:,}"),
        (f"  records over seq_len {info['seq_len']}", f"{info['truncated']:,}"),
        ("rows per epoch" + (" (packed)" if info["packing"] else ""), f"{info['train_sequences']:,}"),
        ("tokens per epoch", f"{info['tokens_per_epoch']:,}"),
        (f"steps per epoch (global batch {info['global_batch']})", f"{info['steps_per_epoch']:,}"),
    ]
    if info["max_steps"] is not None:
        rows.append((f"training.max_steps {info['max_steps']:,}", f"{info['epochs_of_max_steps']:g} epochs"))
    for key, value in rows:
        t.add_row(key, value)
    console.print(t)
    for title, counts in (("formats", info["formats"]), ("managers", info["managers"]), ("stages", info["stages"])):
        if counts:
            console.print(f"[bold]{title}[/bold]: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    for line in info["bad_examples"]:
        console.print(f"[yellow]bad line[/yellow] {line}")
    if info["refusal"]:
        console.print(f"[red]training would stop (too_many_bad_lines)[/red]: {info['refusal']}")
    console.print(f"hours per epoch (estimate): uff-port plan --config {info['config']} "
                  f"--corpus-tokens {info['tokens_per_epoch']}")
