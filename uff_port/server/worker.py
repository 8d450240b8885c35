"""The Port worker: one request loop, one heartbeat thread, one job at a time.

The main thread reads requests and answers the quick ones inline (ping,
status); anything that waits on the trainer or on disk replies later from
another thread, so `status` and `stop` are always answered within
milliseconds whatever training does. Exit paths (shutdown, stdin EOF,
SIGTERM, parent death) all run the same sequence: stop the job with a
checkpoint inside the grace period, kill every child process group, exit with
0 (nothing lost), 75 (stopped early, resumable) or 1 (work may be lost).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port import PROTOCOL_VERSION, __version__
from uff_port.core.exits import ExitCode
from uff_port.procutil import SignalSafeEvent
from uff_port.protocol.errors import CommandError, ErrorCode, disk_full_error
from uff_port.protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameError,
    FrameReader,
    FrameWriter,
    decode_payload,
)
from uff_port.protocol.messages import (
    Arg,
    Request,
    check_args,
    error_reply,
    ok_reply,
    parse_request,
    request_id_of,
)
from uff_port.server import lifetime
from uff_port.server.extension_runner import TaskRunner
from uff_port.server.extensions import EXTENSION_COMMANDS
from uff_port.server.job_slot import JobSlot
from uff_port.server.job_start import JobLauncher, LaunchPlan
from uff_port.server.jobs import Job
from uff_port.server.outbox import DEFAULT_PROGRESS_PER_S, EventStream
from uff_port.server.stdio import claim_stdio
from uff_port.server.telemetry_loop import TelemetryCache

# A finished job's `outcome` (status's last_job, the idle `state` event) by its exit status.
_OUTCOMES: Final[dict[int, str]] = {ExitCode.OK: "finished", ExitCode.RESUMABLE: "stopped", ExitCode.REFUSED: "refused"}

# What a client should allow a reply beyond the grace periods below: validating a
# config, importing the planner, starting a process, on a busy machine.
REPLY_MARGIN_S: Final = 30.0
# A trainer still running after `stop`'s grace period gets SIGTERM, then SIGKILL this much later.
KILL_AFTER_TERM_S: Final = 10.0
# An exit that meets a job still starting waits this long for it, then stops it like any other.
EXIT_STARTING_WAIT_S: Final = 30.0
# An exit waits for the stopped job this long beyond its grace (SIGTERM, SIGKILL, the exit itself).
EXIT_STOP_SLACK_S: Final = KILL_AFTER_TERM_S + 5.0


@dataclass(frozen=True)
class Command:
    """One row of the command table: how a command is checked and how long it may take."""

    args: dict[str, Arg] | None = None
    """Argument schema, checked before the handler runs; None: the command checks its own."""
    long_running: bool = False
    """The reply comes later, from another thread: it waits on a trainer, a child or a grace period."""
    beyond_grace_s: float | None = None
    """The reply comes within the worker's grace period plus this; None: the worker promises no bound."""

    def deadline_s(self, grace_seconds: float) -> float | None:
        return None if self.beyond_grace_s is None else grace_seconds + self.beyond_grace_s


# The command table: dispatch checks `args` and calls `Worker._cmd_<name>`; `hello` lists
# the names (`commands`) and each one's flag and deadline (`command_info`), from which
# clients (the Elixir bridge) take their per-request deadlines.
COMMANDS: Final[dict[str, Command]] = {
    "ping": Command({"echo": Arg((object,), doc="returned unchanged")}),
    "status": Command({}),
    # `train` and `resume` first wait up to the grace period for a trainer orphaned by a
    # dead worker to commit its final checkpoint (JobLauncher._resolve_checkpoint).
    "train": Command(
        {
            "config": Arg((dict,), doc="config map"),
            "config_path": Arg((str,), doc="YAML file or preset name"),
            "run_dir": Arg((str,), doc="run directory under the runs root"),
            "overrides": Arg((dict,), doc="dotted keys"),
            "job_id": Arg((str,)),
            "fresh": Arg((bool,), doc="train from step 0: ignore checkpoints and a finished final/ in run_dir"),
        },
        long_running=True,
        beyond_grace_s=REPLY_MARGIN_S,
    ),
    # Answered `timeout` by the worker itself once the grace period is over.
    "checkpoint": Command({}, long_running=True, beyond_grace_s=REPLY_MARGIN_S),
    "resume": Command(
        {"run_dir": Arg((str,), required=True), "checkpoint": Arg((int, str))},
        long_running=True,
        beyond_grace_s=REPLY_MARGIN_S,
    ),
    "stop": Command(
        {"checkpoint": Arg((bool,)), "cancel": Arg((bool,), doc="cloud jobs: stop the remote job too")},
        long_running=True,
        beyond_grace_s=KILL_AFTER_TERM_S + REPLY_MARGIN_S,
    ),
    "shutdown": Command(
        {}, long_running=True, beyond_grace_s=EXIT_STARTING_WAIT_S + EXIT_STOP_SLACK_S + REPLY_MARGIN_S
    ),
    "bench_events": Command({"count": Arg((int,), required=True), "payload_bytes": Arg((int,))}),
}
# Every extension command: a child process that checks its own args and runs unbounded.
EXTENSION: Final = Command(long_running=True)


@dataclass
class ServeOptions:
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    heartbeat_interval: float = 2.0
    runs_root: Path = field(default_factory=lambda: Path("runs"))
    grace_seconds: float = 100.0
    python: str = sys.executable
    progress_per_s: float = DEFAULT_PROGRESS_PER_S


class Reply:
    """Exactly one reply per request, whichever thread gets there first."""

    def __init__(self, events: EventStream, rid: int) -> None:
        self._events = events
        self.rid = rid
        self._lock = threading.Lock()
        self.sent = False

    def _claim(self) -> bool:
        with self._lock:
            if self.sent:
                return False
            self.sent = True
            return True

    def ok(self, result: dict[str, Any]) -> None:
        if self._claim():
            self._events.reply(ok_reply(self.rid, result))

    def error(self, code: str, message: str, details: Any = None) -> None:
        if self._claim():
            self._events.reply(error_reply(self.rid, code, message, details))

    def from_frame(self, frame: dict[str, Any], transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """Relay a child's reply frame (`ok`/`result` or `error`)."""
        if frame.get("ok"):
            result = frame.get("result") or {}
            self.ok(transform(result) if transform else result)
        else:
            err = frame.get("error") or {}
            self.error(str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", "")), err.get("details"))


DEFERRED: Final = object()
Handler = Callable[[Request, Reply], Any]


class Worker:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.runs_root = Path(opts.runs_root).resolve()
        self.started = time.time()
        # The job slot (state word, job, last job, exit) is changed only through its transitions.
        self.slot = JobSlot(lambda event, **fields: self.events.emit(event, **fields))
        self._stop_ticks = threading.Event()
        self.events: EventStream  # set in serve()/attach()
        self.telemetry = TelemetryCache(interval=max(0.5, opts.heartbeat_interval))
        # One handler per row of the command table, named after it: a missing one fails here.
        self.handlers: dict[str, Handler] = {name: getattr(self, f"_cmd_{name}") for name in COMMANDS}

    # -- wiring ---------------------------------------------------------------
    def attach(self, write_fd: int) -> None:
        """Set up the outgoing stream (separate from serve() so tests can drive dispatch)."""
        self.events = EventStream(FrameWriter(write_fd), progress_per_s=self.opts.progress_per_s)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.tasks = TaskRunner(self.events, self.runs_root, self.opts.python)
        self.launcher = JobLauncher(
            self.runs_root, self.opts.python, self._job_event, lambda: self.telemetry.gpus, self.opts.grace_seconds
        )

    def commands(self) -> list[str]:
        return [*COMMANDS, *EXTENSION_COMMANDS]

    def command_info(self) -> dict[str, dict[str, Any]]:
        """`hello`'s `command_info`: per command, `long_running` and `deadline_s` (or None)."""
        table = {**COMMANDS, **dict.fromkeys(EXTENSION_COMMANDS, EXTENSION)}
        return {
            name: {"long_running": c.long_running, "deadline_s": c.deadline_s(self.opts.grace_seconds)}
            for name, c in table.items()
        }

    def serve(self) -> int:
        fds = claim_stdio()
        self.attach(fds.write_fd)
        self._install_lifetime()
        self.telemetry.start()
        self.events.emit(
            "hello",
            protocol=PROTOCOL_VERSION,
            version=__version__,
            pid=os.getpid(),
            commands=self.commands(),
            command_info=self.command_info(),
            devices=self.telemetry.gpus,
            heartbeat_interval=self.opts.heartbeat_interval,
            max_frame_bytes=self.opts.max_frame_bytes,
            runs_root=str(self.runs_root),
        )
        threading.Thread(target=self._tick_loop, name="heartbeat", daemon=True).start()
        reader = FrameReader(fds.read_fd, self.opts.max_frame_bytes)

        def frame_error(exc: FrameError) -> None:
            self.events.reply(error_reply(None, exc.code, exc.message, exc.details))

        for payload in reader.payloads(frame_error):
            self.handle_payload(payload)
        self.begin_exit("eof")
        while True:  # the exit sequence ends the process with os._exit
            time.sleep(3600)

    def _install_lifetime(self) -> None:
        self._signalled: list[int] = []
        self._signal_event = SignalSafeEvent()
        threading.Thread(target=self._signal_watch, name="signals", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        # Parent death (the VM killed with SIGKILL) arrives as SIGTERM: same graceful path.
        lifetime.set_parent_death_signal(signal.SIGTERM)
        lifetime.watch_parent(lambda: self.begin_exit("parent_died"))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Runs between bytecodes of the main thread, maybe inside itself (a burst of
        # signals): take no lock and start no thread here, only hand over.
        self._signalled.append(signum)
        self._signal_event.set()

    def _signal_watch(self) -> None:
        self._signal_event.wait()
        self.begin_exit(f"signal:{signal.Signals(self._signalled[0]).name}")

    # -- request loop ---------------------------------------------------------
    def handle_payload(self, payload: bytes) -> None:
        try:
            frame = decode_payload(payload)
        except FrameError as exc:
            self.events.reply(error_reply(None, exc.code, exc.message, exc.details))
            return
        try:
            request = parse_request(frame)
        except CommandError as exc:
            self.events.reply(error_reply(request_id_of(frame), exc.code, exc.message, exc.details))
            return
        self.dispatch(request)

    def dispatch(self, request: Request) -> None:
        reply = Reply(self.events, request.id)
        try:
            handler = self.handlers.get(request.cmd)
            if handler is None and request.cmd in EXTENSION_COMMANDS:
                handler = self._cmd_extension
            if handler is None:
                raise CommandError(
                    ErrorCode.UNKNOWN_COMMAND,
                    f"unknown command {request.cmd!r}",
                    {"commands": self.commands()},
                )
            schema = COMMANDS[request.cmd].args if request.cmd in COMMANDS else None
            if schema is not None:
                request = Request(request.id, request.cmd, check_args(request.cmd, request.args, schema))
            exit_reason = self.slot.exit_reason
            if exit_reason is not None and request.cmd not in ("ping", "status", "shutdown"):
                raise CommandError(ErrorCode.SHUTTING_DOWN, f"worker is shutting down ({exit_reason})")
            result = handler(request, reply)
            if result is not DEFERRED:
                reply.ok(result)
        except CommandError as exc:
            reply.error(exc.code, exc.message, exc.details)
        except Exception as exc:
            full = disk_full_error(exc, request.cmd) if isinstance(exc, OSError) else None
            if full is not None:
                reply.error(full.code, full.message, full.details)
                return
            traceback.print_exc(file=sys.stderr)
            reply.error(
                ErrorCode.INTERNAL,
                f"{type(exc).__name__}: {exc}",
                {"traceback": traceback.format_exc(limit=15)},
            )

    # -- state ----------------------------------------------------------------
    def status_view(self) -> dict[str, Any]:
        state, job, last_job = self.slot.view()
        info = job.info if job else None
        last = last_job or {}
        return {
            "state": state,
            "job_id": info.job_id if info else last.get("job_id"),
            "phase": info.phase if info else None,
            "step": info.step if info else last.get("step"),
            "max_steps": info.max_steps if info else last.get("max_steps"),
            "loss": info.loss if info else last.get("loss"),
            "lr": info.lr if info else None,
            "tokens_per_s": info.tokens_per_s if info else None,
            "run_dir": str(info.run_dir) if info else last.get("run_dir"),
            "resumed_from": info.resumed_from if info else None,
            "last_checkpoint": info.last_checkpoint if info else last.get("last_checkpoint"),
            "last_progress_ts": info.last_progress_ts if info else None,
            "last_job": last_job,
        }

    # -- heartbeats -----------------------------------------------------------
    def _tick_loop(self) -> None:
        """Heartbeats on a fixed cadence; also opens the rate limiter's windows.

        Touches only the event stream and cached telemetry, so neither a busy
        trainer nor a hung NVML call can hold it up.
        """
        interval = self.opts.heartbeat_interval
        next_beat = time.monotonic()
        while not self._stop_ticks.is_set():
            now = time.monotonic()
            try:
                self.events.flush_limited()
                if now >= next_beat:
                    snap = self.status_view()
                    self.events.emit(
                        "heartbeat",
                        state=snap["state"],
                        job_id=snap["job_id"],
                        step=snap["step"],
                        last_progress_ts=snap["last_progress_ts"],
                        gpus=self.telemetry.gpus,
                        host=self.telemetry.host,
                    )
                    next_beat = max(next_beat + interval, now + interval / 2)
            except OSError:
                return  # the Port is gone; the exit path takes it from here
            self._stop_ticks.wait(min(0.05, interval))

    # -- commands -------------------------------------------------------------
    def _cmd_ping(self, req: Request, _reply: Reply) -> dict[str, Any]:
        out: dict[str, Any] = {"pong": True, "ts": time.time()}
        if "echo" in req.args:
            out["echo"] = req.args["echo"]
        return out

    def _cmd_status(self, _req: Request, _reply: Reply) -> dict[str, Any]:
        status = self.status_view()
        status.update(
            gpus=self.telemetry.gpus,
            host=self.telemetry.host,
            pid=os.getpid(),
            uptime_s=time.time() - self.started,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            runs_root=str(self.runs_root),
        )
        return status

    def _cmd_bench_events(self, req: Request, _reply: Reply) -> dict[str, Any]:
        count = req.args["count"]
        if not 0 <= count <= 10_000_000:
            raise CommandError(ErrorCode.INVALID_ARGS, "args.count: expected 0..10000000", {"field": "args.count"})
        blob = "x" * int(req.args.get("payload_bytes", 0))
        start = time.perf_counter()
        for i in range(count):
            self.events.emit("bench", i=i, data=blob)
        elapsed = time.perf_counter() - start
        return {"count": count, "seconds": elapsed, "events_per_s": count / elapsed if elapsed else None}

    def _cmd_train(self, req: Request, reply: Reply) -> Any:
        self.slot.check_idle()
        plan = self.launcher.prepare_train(req.args)  # validates; raises CommandError
        self._launch(plan, reply)
        return DEFERRED

    def _cmd_resume(self, req: Request, reply: Reply) -> Any:
        self.slot.check_idle()
        plan = self.launcher.prepare_resume(req.args)
        self._launch(plan, reply)
        return DEFERRED

    def _launch(self, plan: LaunchPlan, reply: Reply) -> None:
        self.slot.begin_start(plan.job_id)

        def run() -> None:
            try:
                job = self.launcher.start(plan, self.events, self._job_exited)
            except CommandError as exc:
                self.slot.start_failed()
                reply.error(exc.code, exc.message, exc.details)
                return
            except Exception as exc:
                self.slot.start_failed()
                full = disk_full_error(exc, "could not start the job") if isinstance(exc, OSError) else None
                if full is not None:
                    reply.error(full.code, full.message, full.details)
                    return
                traceback.print_exc(file=sys.stderr)
                reply.error(ErrorCode.INTERNAL, f"could not start the job: {type(exc).__name__}: {exc}")
                return
            self.slot.started(job)
            reply.ok(
                {
                    "job_id": job.info.job_id,
                    "run_dir": str(job.info.run_dir),
                    "resumed_from": job.info.resumed_from,
                }
            )

        threading.Thread(target=run, name="job-start", daemon=True).start()

    def _job_event(self, name: str, /, **fields: Any) -> None:
        """Events the launcher raises before the trainer exists (quarantine, fresh start).

        Positional-only: event fields may themselves be called `name`
        (`checkpoint_quarantined` carries the checkpoint's name).
        """
        self.events.emit(name, **fields)

    def _job_exited(self, job: Job) -> None:
        info = job.info
        code = info.exit_code
        outcome = _OUTCOMES.get(code if code is not None else -1, "failed")
        last_job = {
            "job_id": info.job_id,
            "run_dir": str(info.run_dir),
            "outcome": outcome,
            "exit_status": code,
            "step": info.step,
            "max_steps": info.max_steps,
            "loss": info.loss,
            "last_checkpoint": info.last_checkpoint,
        }
        # The artifact manifest first: `artifact` comes before the idle `state` event, and
        # the slot holds the job until then, so no `train` starts while it is written.
        if outcome == "finished":
            self.launcher.after_finish(info)
        self.slot.job_exited(job, last_job)

    def _grace(self, job: Job) -> float:
        return min(self.opts.grace_seconds, job.info.grace_seconds)

    def _cmd_checkpoint(self, _req: Request, reply: Reply) -> Any:
        job = self.slot.active_job()
        ended = job.info.terminal_event
        if ended is not None:  # finished/failed already reported: the trainer is only winding down
            raise CommandError(ErrorCode.NO_JOB, f"the job has {ended}; nothing left to checkpoint",
                               {"state": ended, "job_id": job.info.job_id})
        if not job.control("checkpoint", {}, reply.from_frame):
            raise CommandError(ErrorCode.TRAINER_FAILED, "the trainer is not reachable")
        threading.Timer(
            self._grace(job),
            lambda: reply.error(ErrorCode.TIMEOUT, f"checkpoint not durable within {self._grace(job):.0f}s"),
        ).start()
        return DEFERRED

    def _stop_job(
        self, job: Job, checkpoint: bool, on_stopped: Callable[[Job, dict[str, Any]], None], cancel: bool = False
    ) -> None:
        """Ask the trainer to stop; `on_stopped(job, trainer_reply)` runs once it has exited."""
        trainer_reply: dict[str, Any] = {}
        job.stop_requested = True
        args: dict[str, Any] = {"checkpoint": checkpoint}
        if cancel:  # cloud jobs: also stop the remote job instead of detaching from it
            args["cancel"] = True
        job.control("stop", args, trainer_reply.update)
        job.on_exit(lambda j: on_stopped(j, trainer_reply))
        grace = self._grace(job)

        def escalate() -> None:
            # The trainer had its grace period: a polite signal, then the hammer.
            if job.exited.wait(grace):
                return
            job.kill(signal.SIGTERM)
            if not job.exited.wait(KILL_AFTER_TERM_S):
                job.kill(signal.SIGKILL)

        threading.Thread(target=escalate, name="stop-escalation", daemon=True).start()

    def _cmd_stop(self, req: Request, reply: Reply) -> Any:
        checkpoint = req.args.get("checkpoint", True)
        cancel = bool(req.args.get("cancel", False))
        job = self.slot.stopping()

        def stopped(j: Job, trainer_reply: dict[str, Any]) -> None:
            info = j.info
            if info.exit_code in (ExitCode.OK, ExitCode.RESUMABLE):
                ckpt = info.last_checkpoint
                reply.ok(
                    {
                        "job_id": info.job_id,
                        "step": info.step,
                        "checkpoint": ckpt.get("path") if ckpt else None,
                        "exit_status": info.exit_code,
                    }
                )
            else:
                err = trainer_reply.get("error") or {}
                reply.error(
                    str(err.get("code") or ErrorCode.TRAINER_FAILED),
                    str(err.get("message") or f"trainer exited with status {info.exit_code} while stopping"),
                    {"exit_status": info.exit_code, "last_checkpoint": info.last_checkpoint},
                )

        self._stop_job(job, checkpoint, stopped, cancel=cancel)
        return DEFERRED

    def _cmd_shutdown(self, _req: Request, reply: Reply) -> Any:
        self.begin_exit("shutdown", reply)
        return DEFERRED

    def _cmd_extension(self, req: Request, reply: Reply) -> Any:
        target = EXTENSION_COMMANDS[req.cmd]
        self.tasks.start(
            target,
            req.args,
            lambda result, error: reply.ok(result or {})
            if error is None
            else reply.error(str(error.get("code", ErrorCode.INTERNAL)), str(error.get("message", "")), error.get("details")),
        )
        return DEFERRED

    # -- exit -----------------------------------------------------------------
    def begin_exit(self, reason: str, reply: Reply | None = None) -> None:
        if not self.slot.begin_exit(reason):
            if reply is not None:
                reply.error(ErrorCode.SHUTTING_DOWN, f"already shutting down ({self.slot.exit_reason})")
            return
        threading.Thread(target=self._exit_sequence, args=(reason, reply), name="exit", daemon=True).start()

    def _exit_sequence(self, reason: str, reply: Reply | None) -> None:
        code: int = ExitCode.OK
        stopped: dict[str, Any] = {"reason": reason, "job_id": None, "checkpoint": None}
        try:
            self.slot.shutting_down(reason)
            job = self.slot.wait_started(EXIT_STARTING_WAIT_S)  # a job being started is stopped like any other
            if job is not None:
                # A job that already sent `failed` ended on its own: stopping it loses nothing.
                ended_before = job.info.terminal_event is not None
                done = threading.Event()
                self._stop_job(job, True, lambda _j, _r: done.set())
                done.wait(self._grace(job) + EXIT_STOP_SLACK_S)
                info = job.info
                stopped.update(job_id=info.job_id, step=info.step, exit_status=info.exit_code)
                if info.last_checkpoint:
                    stopped["checkpoint"] = info.last_checkpoint.get("path")
                if info.exit_code == ExitCode.OK or ended_before:
                    code = ExitCode.OK
                elif info.exit_code == ExitCode.RESUMABLE:
                    code = ExitCode.OK if reason == "shutdown" else ExitCode.RESUMABLE
                else:
                    code = ExitCode.CRASH
            self.tasks.kill_all()
            if reply is not None:
                reply.ok(stopped)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            code = ExitCode.CRASH
        finally:
            self._stop_ticks.set()
            self.telemetry.stop()
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)


def run_worker(opts: ServeOptions) -> int:
    return Worker(opts).serve()
