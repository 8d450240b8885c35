"""Turning `train` and `resume` requests into a running trainer.

Validation is synchronous and cheap (config schema, paths), so a bad request is
refused at once with every problem listed. Checkpoint discovery re-hashes files
and may take a moment, so it runs on the job-start thread, never on the
request loop.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from uff_port.core import layout
from uff_port.fsutil import UnsafePath, atomic_write_text, confine, confine_existing
from uff_port.protocol.errors import CommandError, ErrorCode
from uff_port.server.jobs import Job, JobInfo, cloud_argv, trainer_argv
from uff_port.server.outbox import EventStream

if TYPE_CHECKING:  # pydantic is imported on the first train request, not at start-up
    from uff_port.core.config import Config

_JOB_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
AUTO: Final = "auto"
_RUN_FILES: Final = (layout.EVENTS, layout.TRAINER_LOG, layout.CHECKPOINTS_LOCK, layout.CONFIG)
_RUN_DIRS: Final = (layout.CHECKPOINTS, f"{layout.CHECKPOINTS}/quarantine", layout.FINAL)
_KILL_WAIT_S: Final = 10.0
MAX_RUN_DIR_BYTES: Final = 1024
"""A run_dir argument longer than this is refused (its files' paths must stay under PATH_MAX)."""
_NAME_MAX: Final = 255
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_run_dir(run_dir: Path) -> None:
    """Refuse (`unsafe_path`) a run directory whose files or subdirectories lead out of it.

    The files we append to must not be symlinks at all (they are opened with
    O_NOFOLLOW anyway); directories must resolve inside the run directory. Checked
    before a job starts so the client gets a coded refusal, not a trainer crash.
    """
    try:
        for name in _RUN_FILES:
            path = run_dir / name
            if path.is_symlink():
                raise UnsafePath(path, run_dir, "is a symlink")
        for name in _RUN_DIRS:
            confine_existing(run_dir, run_dir / name)
    except UnsafePath as exc:
        raise CommandError(
            ErrorCode.UNSAFE_PATH, str(exc), {"path": exc.path, "run_dir": str(run_dir)}
        ) from None


@dataclass
class LaunchPlan:
    job_id: str
    run_dir: Path
    config: Config
    resume_from: Path | str | None  # AUTO: find the newest valid checkpoint
    resumed_step: int | None = None


def _invalid(field: str, message: str, expected: str | None = None) -> CommandError:
    return CommandError(
        ErrorCode.INVALID_ARGS, f"{field}: {message}", {"fields": [{"field": field, "expected": expected or message}]}
    )


def _validate(raw: Any, overrides: dict[str, Any] | None) -> Config:
    from uff_port.core.config import ConfigError, validate_config

    try:
        cfg = validate_config(raw, overrides)
        if cfg.strategy != "local":
            # Cloud settings (SageMaker bucket, role, image, region) are checked before the job is accepted.
            from uff_port.cloud.settings import check_for_strategy, validate_cloud

            check_for_strategy(validate_cloud(cfg.cloud), cfg.strategy)
        return cfg
    except ConfigError as exc:
        raise CommandError(
            ErrorCode.INVALID_CONFIG,
            f"invalid config ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}): "
            + "; ".join(exc.problems),
            {"problems": exc.problems},
        ) from None


def _check_run_dir(run_dir: str) -> None:
    """Refuse names the file system or a log line would choke on, before any path is made."""
    expected = f"a path under the runs root: at most {MAX_RUN_DIR_BYTES} bytes, no control characters"
    if _CONTROL.search(run_dir):
        raise _invalid("args.run_dir", "contains a control character (newline, tab, ...)", expected)
    size = len(run_dir.encode("utf-8", "surrogatepass"))
    if size > MAX_RUN_DIR_BYTES:
        raise _invalid("args.run_dir", f"is {size} bytes long, over the {MAX_RUN_DIR_BYTES}-byte limit", expected)
    if any(len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in Path(run_dir).parts):
        raise _invalid("args.run_dir", f"has a path component over {_NAME_MAX} bytes", expected)


class JobLauncher:
    def __init__(
        self,
        runs_root: Path,
        python: str,
        emit: Callable[..., None],
        devices: Callable[[], list[dict[str, Any]]] = list,
        max_grace_seconds: float = float("inf"),
    ) -> None:
        self.runs_root = runs_root
        self.python = python
        self.emit = emit
        self.devices = devices
        # The worker's --grace-seconds: `train`'s advertised deadline (hello's command_info)
        # assumes no wait for a predecessor lasts longer, whatever the job's config says.
        self.max_grace_seconds = max_grace_seconds

    # -- validation (request loop) ----------------------------------------
    def _run_dir(self, run_dir: str | None, job_id: str | None, name: str) -> tuple[Path, str]:
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            raise _invalid("args.job_id", "must be 1-128 of [A-Za-z0-9._-], starting alphanumeric")
        if run_dir is not None:
            _check_run_dir(run_dir)
        if run_dir is None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
            job_id = job_id or f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            run_dir = job_id
        try:
            path = confine(self.runs_root, run_dir)
        except (ValueError, OSError):
            raise _invalid(
                "args.run_dir", f"{run_dir!r} is outside the runs root {str(self.runs_root)!r}", "a path under the runs root"
            ) from None
        if path == self.runs_root:
            raise _invalid("args.run_dir", "must name a directory below the runs root, not the root itself")
        return path, job_id or path.name

    def prepare_train(self, args: dict[str, Any]) -> LaunchPlan:
        from uff_port.core.config import ConfigError, load_config_file

        if "config" in args and "config_path" in args:
            raise _invalid("args.config", "give either config or config_path, not both")
        if "config" in args:
            raw = args["config"]
        elif "config_path" in args:
            try:
                raw = load_config_file(args["config_path"])
            except ConfigError as exc:
                raise CommandError(ErrorCode.INVALID_CONFIG, "; ".join(exc.problems), {"problems": exc.problems}) from None
        else:
            raise _invalid("args.config", "one of config (a map) or config_path (a string) is required", "map")
        cfg = _validate(raw, args.get("overrides"))
        self._check_fits(cfg)
        self._check_data(cfg)
        run_dir, job_id = self._run_dir(args.get("run_dir"), args.get("job_id"), cfg.name)
        self._check_disk(cfg, run_dir)
        # fresh: no checkpoint is looked for, and the trainer starts at step 0 (--fresh).
        return LaunchPlan(job_id=job_id, run_dir=run_dir, config=cfg, resume_from=None if args.get("fresh") else AUTO)

    def prepare_resume(self, args: dict[str, Any]) -> LaunchPlan:
        from uff_port.core.config import ConfigError, load_config_file

        run_dir, job_id = self._run_dir(args["run_dir"], None, "run")
        cfg_path = run_dir / layout.CONFIG
        if not cfg_path.is_file():
            raise CommandError(ErrorCode.NOT_FOUND, f"{run_dir} has no {layout.CONFIG}: nothing to resume", {"run_dir": str(run_dir)})
        try:
            cfg = _validate(load_config_file(cfg_path), None)
        except ConfigError as exc:
            raise CommandError(ErrorCode.INVALID_CONFIG, "; ".join(exc.problems), {"problems": exc.problems}) from None
        self._check_disk(cfg, run_dir)
        which = args.get("checkpoint")
        if which is None:
            return LaunchPlan(job_id=job_id, run_dir=run_dir, config=cfg, resume_from=AUTO)
        if isinstance(which, int):
            path = run_dir / layout.CHECKPOINTS / f"step-{which:08d}"
        else:
            try:
                path = confine(run_dir, which if Path(which).is_absolute() else Path(layout.CHECKPOINTS) / which)
            except ValueError:
                raise _invalid("args.checkpoint", f"{which!r} is outside {run_dir}") from None
        return LaunchPlan(job_id=job_id, run_dir=run_dir, config=cfg, resume_from=path)

    def _check_fits(self, cfg: Config) -> None:
        """Refuse a config the memory planner says cannot fit, before any GPU minute is spent."""
        try:
            from uff_port.planner.guard import check_config
        except ImportError:
            return
        report = check_config(cfg, self.devices())
        if not report.fits:
            raise CommandError(
                report.code,
                report.message,
                {"estimate": report.estimate, "nearest_fit": report.nearest_fit},
            )

    def _check_data(self, cfg: Config) -> None:
        """Refuse a local job whose data files do not exist, before its run directory is made."""
        from uff_port.core.config import data_path_problems

        problems = data_path_problems(cfg) if cfg.strategy == "local" else []
        if problems:
            raise CommandError(ErrorCode.DATA_NOT_FOUND, "; ".join(problems), {"problems": problems})

    def _check_disk(self, cfg: Config, run_dir: Path) -> None:
        """Refuse a job whose checkpoints cannot fit on the run directory's disk."""
        from uff_port.planner.disk import check_disk

        report = check_disk(cfg, run_dir)
        if not report.fits:
            raise CommandError(ErrorCode.DISK_FULL, report.message, {"needed": report.needed, "free": report.free})

    # -- start (job-start thread) ----------------------------------------
    def _claim_run(self, plan: LaunchPlan, store: Any) -> None:
        """Take the run's writer lock, or refuse with `busy`.

        A trainer whose worker is gone (this worker's predecessor was killed) is
        reclaimed at once: SIGCONT (a stopped trainer can neither checkpoint nor
        exit), SIGTERM (the usual stop: checkpoint, exit 75), and SIGKILL if it
        has not let go of the lock within its grace period. A live worker's
        trainer is waited for up to the grace period, then refused.
        """
        grace = min(plan.config.checkpoint.grace_seconds, self.max_grace_seconds)
        if store.acquire_writer(0.0):
            return
        holder = store.writer_holder()
        if holder is not None and holder.orphaned:
            self.emit("log", job_id=plan.job_id, level="warning", code="orphan_reclaimed", pid=holder.pid,
                      message=f"trainer pid {holder.pid} of a dead worker holds {plan.run_dir}: "
                              "stopping it with a checkpoint")  # fmt: skip
            try:
                pgid = os.getpgid(holder.pid)
                os.killpg(pgid, signal.SIGCONT)
                os.killpg(pgid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pgid = None
            if store.acquire_writer(grace):
                return
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if store.acquire_writer(_KILL_WAIT_S):
                return
        elif store.acquire_writer(grace):
            return
        pid = store.writer_pid()
        raise CommandError(
            ErrorCode.BUSY,
            f"another process (pid {pid}) still holds {plan.run_dir} after {grace:g} s "
            "(checkpoint.grace_seconds, at most the worker's --grace-seconds); stop it or use another run_dir",
            {"writer_pid": pid, "run_dir": str(plan.run_dir)},
        )

    def _resolve_checkpoint(self, plan: LaunchPlan, store: Any) -> tuple[Path | None, int | None]:
        """The checkpoint to resume, chosen while we hold the writer lock (passed on to the trainer)."""
        from uff_port.core.checkpoint_store import CheckpointMismatch
        from uff_port.core.config import resume_hash, resume_view

        cfg = plan.config
        if plan.resume_from is None:
            return None, None
        if plan.resume_from == AUTO:
            try:
                point = store.find_resume_point({"resume_hash": resume_hash(cfg), "resume_view": resume_view(cfg)})
            except CheckpointMismatch as exc:
                raise CommandError(
                    ErrorCode.INVALID_CONFIG,
                    f"{plan.run_dir} holds checkpoints of a different config: {exc}",
                    {"differences": exc.differences},
                ) from None
            except UnsafePath as exc:
                raise CommandError(ErrorCode.UNSAFE_PATH, str(exc), {"path": exc.path}) from None
            return (point.path, point.step) if point else (None, None)
        path = Path(plan.resume_from)  # type: ignore[arg-type]
        return self._verify_explicit(path)

    def _verify_explicit(self, path: Path) -> tuple[Path, int]:
        from uff_port.hashing import verify_tree

        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise CommandError(ErrorCode.NOT_FOUND, f"no committed checkpoint at {path} (manifest.json missing)")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            step = int(manifest["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CommandError(ErrorCode.CORRUPT_CHECKPOINT, f"{manifest_path} is unreadable: {exc}") from None
        report = verify_tree(path, files, exclude=["manifest.json"])
        if not report.ok:
            raise CommandError(
                ErrorCode.CORRUPT_CHECKPOINT, f"checkpoint {path} fails verification: {report.summary()}", report.to_dict()
            )
        return path, step

    def start(self, plan: LaunchPlan, events: EventStream, on_exit: Callable[[Job], None]) -> Job:
        from uff_port.core.checkpoint_store import CheckpointStore
        from uff_port.core.config import config_hash, dump_yaml, resume_hash

        cfg = plan.config
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        check_run_dir(plan.run_dir)
        local = cfg.strategy == "local"
        store = CheckpointStore(
            plan.run_dir,
            keep_last=cfg.checkpoint.keep_last,
            emit=lambda event, /, **f: self.emit(event, job_id=plan.job_id, **f),
        )
        if local:
            self._claim_run(plan, store)
        try:
            resume_path, step = self._resolve_checkpoint(plan, store) if local else (None, None)
            cfg_path = plan.run_dir / layout.CONFIG
            atomic_write_text(
                cfg_path,
                f"# config_hash: {config_hash(cfg)}\n# resume_hash: {resume_hash(cfg)}\n" + dump_yaml(cfg),
            )
            extra = ["--run-dir", str(plan.run_dir), "--config", str(cfg_path), "--job-id", plan.job_id]
            fds: tuple[int, ...] = ()
            if local:
                argv = trainer_argv(self.python)
                if plan.resume_from is None:
                    extra.append("--fresh")
                elif resume_path is not None:
                    # AUTO: the trainer re-checks our pick and may fall back; explicit: exactly this one.
                    extra += ["--resume-hint" if plan.resume_from == AUTO else "--resume-from", str(resume_path)]
                # The lock goes to the trainer with the descriptor that holds it, so no other
                # writer can prune or replace the checkpoint we chose before the trainer runs.
                assert store.lock_fd is not None  # _claim_run took it or raised
                fds = (store.lock_fd,)
                extra += ["--writer-lock-fd", str(store.lock_fd)]
            else:
                argv = cloud_argv(self.python)
            info = JobInfo(
                job_id=plan.job_id,
                run_dir=plan.run_dir,
                kind="trainer" if local else f"cloud:{cfg.strategy}",
                resumed_from=step,
                grace_seconds=cfg.checkpoint.grace_seconds,
                max_steps=cfg.training.max_steps,
                step=step,
            )
            if step is not None:
                info.last_checkpoint = {"step": step, "path": str(resume_path)}
            return Job(info, argv, events, on_exit, extra_argv=extra, pass_fds=fds)
        finally:
            store.release_writer()  # ours only: the trainer's inherited copy keeps the lock

    def after_finish(self, info: JobInfo) -> None:
        """Write the run's artifact manifest (final/artifact.json); a failure is a warning.

        Runs after the trainer exited 0, so `finished` is already in events.jsonl
        and the manifest's metrics include it.
        """
        try:
            from uff_port.registry.runmanifest import write_run_manifest

            path = write_run_manifest(info.run_dir)
            manifest = json.loads(path.read_text())
            self.emit("artifact", job_id=info.job_id, path=str(path), artifact_id=manifest.get("artifact_id"),
                      role=manifest.get("role"))
        except Exception as exc:  # the training result stands; only its manifest is missing
            self.emit("log", job_id=info.job_id, level="warning", code="artifact_manifest_failed",
                      message=f"could not write the artifact manifest: {type(exc).__name__}: {exc}")
