"""`uff-port train | resume | status`: the trainer from a terminal.

`train` and `resume` run the very same trainer process the worker starts, with
a channel of our own to draw a progress bar from its events; Ctrl-C reaches it
as SIGINT (checkpoint, exit 75). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from uff_port.core import layout
from uff_port.core.exits import ExitCode
from uff_port.protocol.errors import ErrorCode

DEFAULT_CONFIG: Final = "tiny"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="fine-tune with a config (default: the tiny CPU preset)")
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="YAML file or preset name in configs/")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/<name>-<utc time>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints already in the run dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strategy", choices=("local", "kaggle", "sagemaker", "hybrid"), default=None,
                   help="where to train (the config's `strategy`); cloud strategies run the cloud job")
    p.set_defaults(func=cmd_train)

    r = subparsers.add_parser("resume", help="continue a run from its newest verified checkpoint")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_resume)

    s = subparsers.add_parser("status", help="last progress and checkpoint of a run directory")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


def _default_run_dir(config: str) -> Path:
    name = Path(config).stem or "run"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


def cmd_train(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or _default_run_dir(args.config)
    overrides = list(args.overrides) + ([f"strategy={args.strategy}"] if args.strategy else [])
    cloud = _cloud_command(run_dir, args.config, overrides)
    if isinstance(cloud, int):
        return cloud
    if cloud is not None:
        # A cloud strategy runs the cloud job, never a silent local run.
        return _run_trainer(run_dir, [], [], args.quiet, cmd=cloud)
    extra = ["--config", str(args.config)] + (["--fresh"] if args.fresh else [])
    _show_config(args.config, overrides, run_dir, args.quiet)
    return _run_trainer(run_dir, extra, overrides, args.quiet)


def _show_config(config: str | Path, overrides: list[str], run_dir: Path, quiet: bool) -> None:
    """One line saying what is about to train; a config that does not load is the trainer's to refuse."""
    if quiet:
        return
    from uff_port.core.config import ConfigError, load_config
    from uff_port.training.__main__ import parse_overrides
    from uff_port.training.console import config_line

    try:
        cfg = load_config(config, parse_overrides(overrides))
    except (ConfigError, OSError, ValueError):
        return
    print(config_line(cfg, run_dir), flush=True)


def _cloud_command(run_dir: Path, config: str, overrides: list[str]) -> list[str] | int | None:
    """The cloud job's command line when the effective strategy is not local; an exit code when refused."""
    from uff_port.core.config import ConfigError, dump_yaml, load_config
    from uff_port.training.__main__ import parse_overrides

    try:
        cfg = load_config(config, parse_overrides(overrides))
        if cfg.strategy == "local":
            return None
        from uff_port.cloud.settings import check_for_strategy, validate_cloud

        check_for_strategy(validate_cloud(cfg.cloud), cfg.strategy)
    except ConfigError as exc:
        print(f"failed (invalid_config): {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    from uff_port.fsutil import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return [sys.executable, "-m", "uff_port.cloud", "run", "--run-dir", str(run_dir),
            "--config", str(run_dir / "config.yaml"), "--job-id", run_dir.name]


def cmd_resume(args: argparse.Namespace) -> int:
    if not (args.run_dir / layout.CONFIG).exists():
        print(f"run_dir: {args.run_dir} has no {layout.CONFIG}; is it a run directory?", file=sys.stderr)
        return 2
    _show_config(args.run_dir / layout.CONFIG, args.overrides, args.run_dir, args.quiet)
    return _run_trainer(args.run_dir, [], args.overrides, args.quiet)


def _run_trainer(run_dir: Path, extra: list[str], overrides: list[str], quiet: bool, cmd: list[str] | None = None) -> int:
    from uff_port.fsutil import UnsafePath
    from uff_port.protocol import FrameReader, decode_payload
    from uff_port.training.console import Display, open_log, summary

    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # the trainer's stdout/stderr (library warnings, tracebacks): the run's log, not the terminal
        log = open_log(run_dir)
    except (OSError, UnsafePath) as exc:
        print(f"failed ({ErrorCode.UNSAFE_PATH}): {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    ours, theirs = socket.socketpair()
    if cmd is None:
        cmd = [sys.executable, "-m", "uff_port.training", "--run-dir", str(run_dir)]
    cmd = cmd + ["--control-fd", str(theirs.fileno())]
    cmd += extra + [a for o in overrides for a in ("--set", o)]
    with log:
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdout=log, stderr=log)
    theirs.close()
    bar = Display(quiet)
    reader = FrameReader(ours.fileno())
    try:
        while True:
            try:
                payload = reader.read()
            except KeyboardInterrupt:
                continue  # the trainer got SIGINT too: wait for its checkpoint
            if payload is None:
                break
            bar.update(decode_payload(payload))
    finally:
        bar.close()
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue
    ours.close()
    png: Path | None = run_dir / "training.png"
    try:  # the trainer draws it; a cloud run's is drawn here from the events it brought home
        from uff_port.training.plot import plot_run

        if png is None or not png.is_file():
            png = plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - a missing plot never fails a run
        print(f"plot: {exc}", file=sys.stderr)
    artifact = None
    if code == 0:
        try:  # every finished run carries its artifact manifest, as under the worker
            from uff_port.registry.manifest import load_manifest
            from uff_port.registry.runmanifest import write_run_manifest

            artifact = load_manifest(write_run_manifest(run_dir)).artifact_id
        except Exception as exc:  # noqa: BLE001 - the adapter stands without it
            print(f"artifact manifest: {exc}", file=sys.stderr)
    summary(bar, run_dir, code, artifact=artifact, plot=png)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + N


def run_status(run_dir: Path) -> dict[str, Any]:
    """Summary of a run directory from events.jsonl and its committed checkpoints."""
    from uff_port.core.checkpoint_store import CheckpointStore
    from uff_port.fsutil import UnsafePath
    from uff_port.training.reporting import read_events

    events = read_events(run_dir)
    last: dict[str, dict[str, Any] | None] = {name: None for name in ("progress", "eval", "state", "finished", "failed")}
    for ev in events:
        if ev.get("event") in last:
            last[ev["event"]] = ev
    try:
        points = CheckpointStore(run_dir).list_committed()
    except UnsafePath:  # checkpoints/ leads out of the run: not ours to list
        points = []
    prog: dict[str, Any] = last["progress"] or {}
    state = (last["state"] or {}).get("state")
    fin, fail = last["finished"], last["failed"]
    if fin and (not fail or fin["ts"] > fail["ts"]):
        state = "finished"
    elif last["failed"]:
        state = "failed"
    return {
        "run_dir": str(run_dir),
        "state": state,
        "step": prog.get("step"),
        "max_steps": prog.get("max_steps"),
        "loss": prog.get("loss"),
        "tokens_per_s": prog.get("tokens_per_s"),
        "eval_loss": (last["eval"] or {}).get("loss"),
        "last_checkpoint": str(points[-1].path) if points else None,
        "checkpoints": [p.step for p in points],
        "final": str(run_dir / layout.FINAL) if (run_dir / layout.FINAL / layout.MANIFEST).exists() else None,
        "failed": last["failed"],
        "events": len(events),
    }


def cmd_status(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        print(f"run_dir: no such directory {args.run_dir}", file=sys.stderr)
        return 2
    info = run_status(args.run_dir)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if key != "failed" or value:
            print(f"{key:>16}: {value}")
    return 0


