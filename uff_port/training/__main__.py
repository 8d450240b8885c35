"""`python -m uff_port.training`: the trainer process (docs/internals.md section 1).

    python -m uff_port.training --run-dir RUN_DIR --config CONFIG \
        [--control-fd N] [--job-id ID] [--resume-from DIR | --resume-hint DIR | --fresh]
        [--writer-lock-fd N] [--set k=v ...]

Exit codes: 0 finished, 75 stopped early with a durable checkpoint, 3 refused
before training (bad config, missing model, won't fit), other: crashed.
With `distributed.nproc > 1` (and not yet under torchrun) this process is
only a launcher for torchrun; see torchrun_launcher.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Final

from uff_port.core import layout
from uff_port.core.config import Config, ConfigError, dump_yaml, load_config
from uff_port.core.exits import ExitCode
from uff_port.procutil import set_parent_death_signal
from uff_port.protocol import ErrorCode, failed_fields
from uff_port.training.reporting import Reporter

CHANNEL_SOCKET_ENV: Final = "UFF_PORT_CHANNEL_SOCKET"
EXIT_FILE_ENV: Final = "UFF_PORT_EXIT_FILE"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set training.max_steps=40`: values are YAML scalars (numbers, bools, lists), else plain text."""
    from uff_port.core.config_io import ConfigLimitError, parse_yaml_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"{item}: overrides look like dotted.key=value"])
        try:
            out[key.strip()] = parse_yaml_value(value, f"--set {key.strip()}")
        except ConfigLimitError as exc:
            if "is not valid YAML" not in exc.problem:
                raise ConfigError([exc.problem]) from None  # over a limit (an alias bomb): refused
            out[key.strip()] = value  # not a YAML scalar (a Jinja template, say): the text as given
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uff_port.training", description="uff-port trainer process")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--config", default=None, help="YAML config (default: RUN_DIR/config.yaml)")
    p.add_argument("--control-fd", type=int, default=None, help="channel to the worker (socketpair end)")
    p.add_argument("--job-id", default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume-from", type=Path, default=None, help="a verified checkpoint directory")
    g.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    g.add_argument("--resume-hint", type=Path, default=None,
                   help="the newest checkpoint as the worker verified it under the lock it hands over; "
                        "re-checked, and any checkpoint that fails is quarantined and the next one used")
    p.add_argument("--writer-lock-fd", type=int, default=None,
                   help="an inherited descriptor holding the run's writer lock (flock)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _channel_fd(args: argparse.Namespace) -> tuple[int | None, socket.socket | None]:
    """The worker's fd, or (rank 0 under our launcher) the launcher's relay socket."""
    if args.control_fd is not None:
        return args.control_fd, None
    path = os.environ.get(CHANNEL_SOCKET_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock.fileno(), sock
    return None, None


def _write_exit(code: int) -> None:
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(f"{code}\n")


def _refuse(report: Reporter, code: str, message: str, details: Any = None) -> int:
    report.emit("failed", **failed_fields(code, message, resumable=False, details=details))
    return ExitCode.REFUSED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # Hear of a dead worker even if our channel were somehow kept open.
    set_parent_death_signal(signal.SIGTERM)
    if args.control_fd is not None:
        from uff_port.core.checkpoint_store import WORKER_PID_ENV

        # Our parent is the worker: recorded with the writer lock (ranks inherit it), so a
        # restarted worker can tell an orphan of a dead worker from a live worker's trainer.
        os.environ.setdefault(WORKER_PID_ENV, str(os.getppid()))
    run_dir: Path = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_launcher = False
    fd, sock = _channel_fd(args)
    report = Reporter(run_dir, channel_fd=fd, rank=int(os.environ.get("RANK", "0")), job_id=args.job_id)
    if report.file_refused is not None:
        return _refuse(report, ErrorCode.UNSAFE_PATH, report.file_refused)
    config_path = args.config or run_dir / layout.CONFIG
    if Path(config_path).absolute().parent == run_dir and Path(config_path).is_symlink():
        # The run's own config.yaml is the worker's file: a link planted there is not read through.
        return _refuse(report, ErrorCode.UNSAFE_PATH, f"{config_path}: is a symlink; refusing to read through it")
    try:
        cfg = load_config(config_path, parse_overrides(args.overrides))
    except ConfigError as exc:
        return _refuse(report, ErrorCode.INVALID_CONFIG, str(exc), exc.problems)
    if cfg.strategy != "local":
        # Never a silent local run of a cloud config: that path is `python -m uff_port.cloud run`.
        return _refuse(report, ErrorCode.INVALID_CONFIG, f"strategy: {cfg.strategy} runs in the cloud (uff-port train, or "
                       "python -m uff_port.cloud run); the trainer runs strategy: local only")
    if "LOCAL_RANK" not in os.environ:
        resolved = run_dir / layout.CONFIG
        if not resolved.exists() or Path(config_path).resolve() != resolved or args.overrides:
            from uff_port.fsutil import atomic_write_text

            atomic_write_text(resolved, dump_yaml(cfg))
        is_launcher = cfg.distributed.nproc > 1 or cfg.distributed.nnodes > 1
    if "LOCAL_RANK" not in os.environ and not args.fresh and args.resume_from is None:
        done = _already_finished(cfg, run_dir, report)
        if done is not None:
            return done
    if is_launcher:
        from uff_port.training.torchrun_launcher import launch

        if args.writer_lock_fd is not None:
            # torchrun passes no descriptors on: rank 0 takes the lock itself, and
            # because the lock was let go it re-verifies everything it resumes from.
            os.close(args.writer_lock_fd)

        # Ranks re-read the resolved config; the overrides are already in it.
        child_argv = _strip(argv, {"--control-fd", "--config", "--set", "--writer-lock-fd"}) + ["--config", str(run_dir / layout.CONFIG)]
        return launch(child_argv, cfg, fd, report)
    code = run(cfg, run_dir, args, report, fd)
    _write_exit(code)
    if sock is not None:
        sock.close()
    return code


def _already_finished(cfg: Config, run_dir: Path, report: Reporter) -> int | None:
    """A run whose `final/` is this config's finished export is reported finished, untouched.

    No model is loaded and nothing is rewritten, so the artifact id stays what it
    was; `--fresh` (the worker's `fresh: true`) trains again from step 0.
    """
    from uff_port.core.checkpoint_store import CheckpointStore
    from uff_port.fsutil import UnsafePath
    from uff_port.protocol import finished_fields
    from uff_port.training.export import finished_export
    from uff_port.training.reporting import read_events

    manifest = finished_export(run_dir, cfg)
    if manifest is None:
        return None
    last: dict[str, Any] = next((e for e in reversed(read_events(run_dir)) if e.get("event") == "finished"), {})
    try:
        points = CheckpointStore(run_dir).list_committed()
    except UnsafePath:
        points = []
    step = int(manifest["step"])
    final = run_dir / layout.FINAL
    report.emit("log", level="info", code="already_finished", step=step, path=str(final),
                message=f"{run_dir} already finished at step {step}; {final} left as it is "
                        "(train again from step 0 with --fresh, or fresh: true)")
    report.emit("finished", **finished_fields(
        step=step, max_steps=cfg.training.max_steps, loss=last.get("loss"), eval_loss=last.get("eval_loss"),
        final=str(final), last_checkpoint=str(points[-1].path) if points else None,
        tokens_seen=last.get("tokens_seen"),
    ))
    return int(ExitCode.OK)


class LoadingWatcher:
    """Answers the channel while the model loads (minutes for 6.7B), when the loop cannot.

    `status` gets state "loading"; a stop, EOF or signal ends the process at once
    with 75: nothing has been trained since the last checkpoint, so nothing is lost.
    """

    def __init__(self, inbox: Any, report: Reporter, exit_hook: Any) -> None:
        import threading

        self.inbox = inbox
        self.report = report
        self.exit_hook = exit_hook
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="loading-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        from uff_port.training.channel import EOF, SIGNAL

        while not self.done.wait(0.05):
            for c in self.inbox.poll():
                if self.done.is_set():  # the loop owns the channel now: hand it back
                    self.inbox.put(c)
                elif c.cmd == "status":
                    self.report.reply(c.id, {"step": None, "max_steps": None, "loss": None, "last_checkpoint": None, "state": "loading"})
                elif c.cmd == "checkpoint":
                    self.report.reply(c.id, error={"code": ErrorCode.BUSY, "message": "the model is still loading: no step to checkpoint yet"})
                elif c.cmd in ("stop", EOF, SIGNAL):
                    if c.cmd == "stop":
                        self.report.reply(c.id, {"step": None, "checkpoint": None})
                    self.report.emit("state", state="stopped", step=None, checkpoint=None, during="loading")
                    self.exit_hook(ExitCode.RESUMABLE)
                    os._exit(ExitCode.RESUMABLE)
                else:
                    self.report.reply(c.id, error={"code": ErrorCode.UNKNOWN_COMMAND, "message": f"trainer does not know {c.cmd!r}"})


def _strip(argv: list[str], flags: set[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def run(cfg: Config, run_dir: Path, args: argparse.Namespace, report: Reporter, fd: int | None) -> int:
    """Set up and train; every way out is an exit code and, on failure, a `failed` event."""
    # Heavy imports only now: a refused config above never loads torch.
    from uff_port.core.checkpoint_store import CheckpointMismatch
    from uff_port.fsutil import UnsafePath
    from uff_port.training import dist
    from uff_port.training.channel import Inbox
    from uff_port.training.data import DataError
    from uff_port.training.model import ModelError
    from uff_port.training.trainer import StopTraining, Trainer, TrainError

    inbox = Inbox()
    inbox.install_signal_handlers()
    if fd is not None:
        inbox.start_reader(fd)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if cfg.model.name_or_path.startswith("builtin:"):
        from uff_port.training.builtin import resolve_model_path

        # Before joining the process group: transformers' save_pretrained writes
        # nothing on a rank other than 0 once torch.distributed is initialised.
        try:
            resolve_model_path(cfg.model.name_or_path)
        except ValueError as exc:
            return _refuse(report, ErrorCode.MODEL_NOT_FOUND, f"model.name_or_path: {exc}")
    dist.init_from_env()
    recipe: type[Trainer] = Trainer
    if cfg.stage == "rl":
        from uff_port.training.rl import RLTrainer

        recipe = RLTrainer
    trainer = recipe(
        cfg, run_dir, reporter=report, inbox=inbox, resume_from=args.resume_from, fresh=args.fresh,
        resume_hint=args.resume_hint, writer_lock_fd=args.writer_lock_fd,
    )  # fmt: skip
    started = False
    watcher = LoadingWatcher(inbox, report, exit_hook=_write_exit)
    try:
        watcher.start()
        try:
            trainer.setup()
        finally:
            watcher.finish()
        started = True
        return trainer.train()
    except StopTraining as stop:
        return stop.code
    except CheckpointMismatch as exc:
        return _refuse(report, ErrorCode.CHECKPOINT_MISMATCH, str(exc), exc.differences)
    except UnsafePath as exc:  # a symlink out of the run directory, found by the checkpoint store
        trainer.settle()
        report.emit("failed", **failed_fields(exc.code, str(exc), resumable=False, step=trainer.step))
        return ExitCode.REFUSED if not started else ExitCode.CRASH
    except (ModelError, DataError, TrainError) as exc:
        trainer.settle()
        # A final error (non-finite training) would only repeat after a resume: never resumable.
        resumable = not getattr(exc, "final", False) and (
            bool(getattr(exc, "resumable", False)) or (started and trainer.last_checkpoint is not None)
        )
        report.emit("failed", **failed_fields(exc.code, exc.message, resumable=resumable, step=trainer.step))
        return ExitCode.REFUSED if not started else ExitCode.CRASH
    except Exception as exc:  # noqa: BLE001 - the worker must hear why, whatever it was
        trainer.settle()
        report.emit(
            "failed",
            **failed_fields(
                ErrorCode.TRAINER_FAILED,
                f"{type(exc).__name__}: {exc}",
                resumable=trainer.last_checkpoint is not None,
                step=trainer.step,
                details=traceback.format_exc()[-4000:],
            ),
        )
        return ExitCode.CRASH
    finally:
        trainer.cleanup()
        dist.shutdown()


if __name__ == "__main__":
    exit_code = main()
    # Events are on disk and on the channel, checkpoints durable: skip the slow
    # interpreter teardown (torch, OpenMP pools) so a stop is answered by a prompt exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
