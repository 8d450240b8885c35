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

    from uff_port.training import inspect_cli

    inspect_cli.register(subparsers)  # `data inspect`


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
    refused = _refusal(args.config, overrides)
    if refused is not None:  # before the run directory exists: a refused config leaves nothing behind
        code, message = refused
        print(f"failed ({code}): {message}", file=sys.stderr)
        return ExitCode.REFUSED
    extra = ["--config", str(args.config)] + (["--fresh"] if args.fresh else [])
    _show_config(args.config, overrides, run_dir, args.quiet)
    return _run_trainer(run_dir, extra, overrides, args.quiet)


def _refusal(config: str, overrides: list[str]) -> tuple[str, str] | None:
    """(code, message) when the config, its data files or this machine rule the run out; in
    milliseconds, with no torch: the trainer checks again (and the formats) before its model loads."""
    from uff_port.core.config import ConfigError, data_path_problems, load_config
    from uff_port.protocol import ErrorCode
    from uff_port.training.__main__ import parse_overrides

    try:
        cfg = load_config(config, parse_overrides(overrides))
    except ConfigError as exc:
        return ErrorCode.INVALID_CONFIG, "; ".join(exc.problems)
    problems = data_path_problems(cfg)
    if problems:
        return ErrorCode.DATA_NOT_FOUND, "; ".join(problems)
    try:
        from uff_port.planner.guard import check_config
        from uff_port.telemetry.gpu import sample_gpus
    except ImportError:  # planner not built into this installation
        return None
    report = check_config(cfg, sample_gpus())
    return None if report.fits else (report.code, report.message)


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
    _forward_hangup(proc)
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


def _forward_hangup(proc: subprocess.Popen[bytes]) -> None:
    """SIGHUP (the terminal or SSH session went away) stops the trainer like Ctrl-C: it
    checkpoints and exits 75, and we stay to collect it instead of dying first.

    The trainer shares our process group, so a hang-up usually reaches it directly;
    a SIGHUP sent to us alone is passed on as SIGTERM. Ignored under `nohup`.
    """
    import signal

    from uff_port.procutil import detach_from_dead_terminal

    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return

    def on_hup(_signum: int, _frame: Any) -> None:
        detach_from_dead_terminal()
        try:
            proc.send_signal(signal.SIGTERM)
        except (ProcessLookupError, OSError):
            pass

    signal.signal(signal.SIGHUP, on_hup)


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
    holder = _live_trainer(run_dir, events)
    if holder is None and state not in _SETTLED:
        state = "dead"  # said it was busy, but nothing holds the run: killed (SIGKILL, OOM killer, power)
    return {
        "run_dir": str(run_dir),
        "state": state,
        "alive": holder is not None,
        "pid": holder,
        # Where `uff-port resume` (or the same train again) starts: the newest committed checkpoint.
        "resumes_from_step": None if state == "finished" else (points[-1].step if points else 0),
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


_SETTLED: Final = frozenset({"finished", "failed", "stopped", None})
"""States after which no trainer is expected to hold the run directory."""


def _live_trainer(run_dir: Path, events: list[dict[str, Any]]) -> int | None:
    """The pid of a live trainer of this run: the holder of its writer lock, or one still loading.

    The lock is probed (a non-blocking shared flock, let go at once), never
    trusted from the pid written in the file. A trainer takes it once its model
    is loaded; before that its `loading` event names its pid, checked in /proc.
    """
    import fcntl
    import os

    from uff_port.core.checkpoint_store import CheckpointStore
    from uff_port.fsutil import UnsafePath, open_confined_fd

    store = CheckpointStore(run_dir)
    try:
        fd = open_confined_fd(run_dir, store.lock_path, os.O_RDONLY)
    except (OSError, UnsafePath):
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return store.writer_pid() or -1
        finally:
            os.close(fd)  # drops our probe's lock, if we got it
    loading = next((e for e in reversed(events) if e.get("event") == "state"), None)
    pid = (loading or {}).get("pid")
    if loading and loading.get("state") == "loading" and isinstance(pid, int) and _is_trainer(pid):
        return pid
    return None


def _is_trainer(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as fh:
            zombie = fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False
    return not zombie and b"uff_port.training" in argv


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
            print(f"{key:>17}: {value}")
    if info["state"] == "dead":
        print(f"no live trainer holds {args.run_dir} (killed?): `uff-port resume {args.run_dir}` continues "
              f"from step {info['resumes_from_step']}")
    return 0


