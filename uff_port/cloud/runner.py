"""Drive one run through cloud sessions until it is finished, home and verified.

One loop, one journal. Each pass looks at the current session's durable
state and does the one next thing: route, submit (idempotently), poll, pull,
verify, install. Every state is written before it is acted on, so a worker
killed anywhere restarts in the right place (docs/cloud.md, "Recovery").

Provider errors are of two kinds: `ProviderUnavailable` backs off and polls
again (an outage is not a failure, and a job we cannot see may still run), a
`ProviderError` fails the run with a clear message. A missing client package
(`ProviderNotAvailable`) fails it with `not_available` and `resumable: false`:
restarting the worker cannot install it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port.cloud.backends.base import (
    Backend,
    ProviderError,
    ProviderNotAvailable,
    ProviderUnavailable,
    SessionSpec,
)
from uff_port.cloud.backends.sagemaker import job_name
from uff_port.cloud.bundle import BundleError, build_bundle, build_wheel, data_files
from uff_port.cloud.corpus import CorpusError, load_key, stage_corpus
from uff_port.cloud.events_merge import merge_events
from uff_port.cloud.journal import REMOTE_DONE, SETTLED, Journal, crash_point
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.routing import Route, choose_backend
from uff_port.cloud.settings import CloudSettings, backend_settings
from uff_port.cloud.verify import check_pull
from uff_port.cloud.weights import MODEL_NOT_FOUND, WeightsError, WeightsPlan, plan_weights
from uff_port.core import layout
from uff_port.core.checkpoint_store import CheckpointStore
from uff_port.core.config import Config, dump_yaml
from uff_port.core.exits import ExitCode
from uff_port.fsutil import atomic_write_json, atomic_write_text, fsync_tree, replace_dir
from uff_port.procutil import SignalSafeEvent
from uff_port.protocol import ErrorCode, failed_fields, finished_fields

MAX_CONSECUTIVE_FAILURES: Final = 3

Emit = Callable[..., None]
BackendFactory = Callable[[str], Backend]


@dataclass
class Control:
    """Requests from the worker, set by the channel thread, read by the loop."""

    detach: bool = False
    stop: bool = False
    cancel: bool = False
    """`stop` with `cancel: true`: stop the remote job too (it checkpoints first)."""
    stop_reply: Callable[[dict[str, Any]], None] | None = None
    wake: SignalSafeEvent = field(default_factory=SignalSafeEvent)
    """Set from the channel thread and from SIGTERM handlers: must never take a lock."""


class CloudRun:
    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        settings: CloudSettings,
        *,
        run_id: str,
        backend_factory: BackendFactory,
        ledger: QuotaLedger,
        emit: Emit,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
        gpu_present: bool = False,
        control: Control | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.settings = settings
        self.run_id = run_id
        self.factory = backend_factory
        self.ledger = ledger
        self.emit = emit
        self.clock = clock
        self.time_scale = time_scale
        """Simulated seconds per real second of `clock` (uff_port.cloud.timescale); waits shrink by it."""
        self._sleep = sleep
        self.gpu_present = gpu_present
        self.control = control or Control()
        self.journal = Journal.open(run_dir, run_id, cfg.strategy)
        self._live_cursors: dict[str, dict[str, Any]] = {}
        self._live_step = -1
        # A restarted worker may hand us a new job id: names and ledger keys
        # stay those of the journal, or recovery would submit a second job.
        self.run_id = self.journal.data.run_id
        self._backends: dict[str, Backend] = {}
        self._unreachable_since: float | None = None
        self._delay = settings.poll.interval_seconds

    # ---- helpers ------------------------------------------------------------
    def wait(self, seconds: float) -> None:
        seconds /= self.time_scale
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            # Woken early by stop/EOF from the channel thread.
            self.control.wake.wait(seconds)
            self.control.wake.clear()

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            self._backends[name] = self.factory(name)
        return self._backends[name]

    def local_checkpoint(self) -> tuple[int, Path] | None:
        point = CheckpointStore(self.run_dir).latest()
        return (point.step, point.path) if point else None

    def status(self) -> dict[str, Any]:
        ck = self.local_checkpoint()
        cur = self.journal.current
        return {
            "state": "finished" if self.journal.data.finished else f"cloud_{cur.state}" if cur else "cloud_routing",
            "step": ck[0] if ck else 0,
            "max_steps": self.cfg.training.max_steps,
            "loss": None,
            "last_checkpoint": str(ck[1]) if ck else None,
            "cloud": self.journal.summary(),
        }

    def _spec(self, index: int, name: str, budget: float) -> SessionSpec:
        extra = {}
        for key in ("weights", "corpus"):
            path = self.run_dir / layout.CLOUD / f"{key}.json"
            if path.is_file():
                extra[key] = json.loads(path.read_text(encoding="utf-8"))
        return SessionSpec(
            run_id=self.run_id,
            name=name,
            index=index,
            bundle_dir=self.run_dir / layout.CLOUD / "bundle",
            budget_seconds=budget,
            margin_seconds=self.settings.safety_margin_seconds,
            extra=extra,
        )

    def _stage_corpus(self) -> dict[str, Any] | None:
        """The corpus as one content-addressed piece (sealed when encryption is on), staged once."""
        record = self.run_dir / layout.CLOUD / "corpus.json"
        files = data_files(self.cfg.to_dict(), Path.cwd())
        if not files:
            record.unlink(missing_ok=True)
            return None
        enc = self.settings.encryption
        key = load_key(enc.key_env) if enc.enabled else None
        corpus = stage_corpus(files, self.run_dir.parent / ".cloud-cache" / "corpus", key)
        info = {**corpus.meta(), "path": str(corpus.path), "kaggle_secret": enc.kaggle_secret if key else None,
                "sagemaker_secret_id": enc.sagemaker_secret_id if key else None}
        atomic_write_json(record, info)
        return corpus.meta()

    def _plan_weights(self, backend: str) -> WeightsPlan:
        """Where the job gets the base model; the plan (with the local copy to upload) stays home."""
        plan = plan_weights(self.cfg.to_dict(), self.settings, backend, cache=self.run_dir.parent / ".cloud-cache" / "weights-hashes.json")
        atomic_write_json(self.run_dir / layout.CLOUD / "weights.json", {**plan.to_meta(), "local_dir": plan.local_dir})
        return plan

    def _session_name(self, backend: str, index: int) -> str:
        return job_name(self.run_id, index)

    def _need_seconds(self) -> float | None:
        if self.settings.estimate_hours is None:
            return None
        ck = self.local_checkpoint()
        done = (ck[0] if ck else 0) / self.cfg.training.max_steps
        return max(0.0, (1.0 - done) * self.settings.estimate_hours * 3600.0)

    # ---- the loop -----------------------------------------------------------
    def run(self) -> int:
        while True:
            if self.journal.data.finished:
                return self._finish()
            if self.control.detach:
                self.journal.save()
                return ExitCode.RESUMABLE  # detached: the journal holds the run
            if self.control.stop and not self.control.cancel:
                # The worker's own exit sends `stop` too: never cancel paid-for
                # remote work on it. Leave it running; the journal knows it.
                return self._reply_stop(remote=self._remote_note())
            try:
                outcome = self._step()
            except ProviderUnavailable as exc:
                self._outage(str(exc))
                continue
            except ProviderNotAvailable as exc:
                self._fail(ErrorCode.NOT_AVAILABLE, str(exc), resumable=False)
                # Nothing was started and a restart would end the same way (bad config, missing SDK).
                return ExitCode.REFUSED
            except WeightsError as exc:
                # Nothing uploaded or reserved yet: the user must attach the model first.
                self._fail(MODEL_NOT_FOUND, str(exc), resumable=False)
                return ExitCode.REFUSED
            except CorpusError as exc:
                # Encryption asked for and no usable key (or no cryptography): nothing left this machine.
                self._fail(ErrorCode.INVALID_CONFIG, str(exc), resumable=False)
                return ExitCode.REFUSED
            except (ProviderError, BundleError) as exc:
                # The provider refused (credentials, a bad request) or the bundle is invalid:
                # the same `train` would meet the same refusal, so a restart cannot help.
                code = ErrorCode.TRAINER_FAILED if isinstance(exc, ProviderError) else ErrorCode.INVALID_CONFIG
                return self._fail(code, str(exc), resumable=False)
            if self._unreachable_since is not None:
                self.emit("cloud_status", reachable=True, outage_seconds=round(self.clock() - self._unreachable_since, 1))
                self._unreachable_since = None
            self._delay = self.settings.poll.interval_seconds
            if outcome is not None:
                return outcome

    def _outage(self, message: str) -> None:
        now = self.clock()
        if self._unreachable_since is None:
            self._unreachable_since = now
            self.emit("cloud_status", reachable=False, message=message)
        self.wait(self._delay)
        # Exponential back-off, capped: a long outage costs few requests.
        self._delay = min(self._delay * 2, self.settings.poll.max_backoff_seconds)

    def _step(self) -> int | None:
        cur = self.journal.current
        if cur is not None and cur.state == "refused" and cur.pull_attempts <= self.settings.poll.pull_retries:
            return self._pull(cur)
        if cur is not None and cur.state in REMOTE_DONE:
            return self._pull(cur)
        if cur is None or cur.state in SETTLED:
            if self.control.stop:
                return self._reply_stop()
            return self._start_session()
        backend = self.backend(cur.backend)
        spec = self._spec(cur.index, cur.name, cur.budget_seconds)
        if cur.state == "submitting":
            ref = backend.find(spec)
            if ref is None:
                ref = backend.submit(spec)
                crash_point("after_submit")
                self.emit("cloud_submitted", backend=cur.backend, session=cur.name, index=cur.index, budget_seconds=cur.budget_seconds)
            else:
                self.emit("cloud_submitted", backend=cur.backend, session=cur.name, index=cur.index, recovered=True)
            self.journal.transition("submitted", now=self.clock(), remote_ref=ref)
            return None
        if cur.state in ("submitted", "running"):
            return self._poll(backend, cur)
        if cur.state in REMOTE_DONE:
            return self._pull(cur)
        if cur.state == "pulled":
            return self._verify(cur)
        raise ProviderError(f"journal in unexpected state {cur.state}")

    def _start_session(self) -> int | None:
        sessions = self.journal.data.sessions
        # A session that failed but moved the run forward (a crash after some
        # checkpoints) is progress; only failures that bring nothing count.
        best, failures = 0, 0
        for s in sessions:
            if (s.step or 0) > best:
                best, failures = s.step or 0, 0
            elif s.remote_state == "failed" or s.state == "refused":
                failures += 1
        if failures >= MAX_CONSECUTIVE_FAILURES:
            return self._fail(ErrorCode.TRAINER_FAILED, f"{failures} sessions in a row failed remotely; last: {sessions[-1].detail}",
                              resumable=False)
        now = self.clock()
        route = self._route(now)
        if route.backend == "local":
            return -1  # the caller hands the run to the local trainer
        if route.backend is None:
            self.emit("quota", waiting=True, wait_until=route.wait_until, reason=route.reason, budgets=self.ledger.budget_view(now))
            assert route.wait_until is not None
            self.wait(max(1.0, min(route.wait_until - now, self.settings.poll.max_backoff_seconds)))
            return None
        limit = backend_settings(self.settings, route.backend).max_sessions
        if len(sessions) >= limit:
            return self._fail(ErrorCode.TRAINER_FAILED, f"cloud.{route.backend}.max_sessions: {limit} sessions used and the run is not finished",
                              resumable=False)
        # The provider's client first: a missing SDK fails here, before a wheel
        # is built, a bundle written or an hour of quota reserved.
        self.backend(route.backend)
        weights = self._plan_weights(route.backend)
        corpus = self._stage_corpus()
        index = len(sessions)
        name = self._session_name(route.backend, index)
        ck = self.local_checkpoint()
        wheel = build_wheel(self.run_dir.parent / ".cloud-cache")
        # The bundle is rebuilt from durable local state, so it may be built
        # before the intent record: a crash here leaves nothing to undo.
        build_bundle(
            self.run_dir / layout.CLOUD / "bundle",
            self.cfg.to_dict(),
            run_id=self.run_id,
            session=name,
            wheel=wheel,
            resume_from=self._resume_tree(ck),
            model=weights.to_meta(),
            corpus=corpus,
            secrets=[v for v in [os.environ.get(self.settings.encryption.key_env)] if v],
        )
        with self.ledger.routing_lock():
            # Another run may have taken this backend while the bundle was built: route again
            # under the lock, so the check and the reservation are one step; if the answer
            # changed, the next pass starts over (the bundle is rebuilt from the same state).
            now = self.clock()
            again = self._route(now)
            if again.backend != route.backend:
                return None
            self.journal.begin_session(route.backend, name, now=now, budget_seconds=again.session_seconds)
            self.ledger.reserve(f"{self.run_id}:{name}", route.backend, now, again.session_seconds)
        self.emit("quota", backend=route.backend, reserved_hours=round(again.session_seconds / 3600, 3), reason=again.reason, budgets=self.ledger.budget_view(now))
        return None

    def _route(self, now: float) -> Route:
        return choose_backend(
            self.cfg.strategy, self.ledger, self.settings, now, gpu_present=self.gpu_present, need_seconds=self._need_seconds(),
            run_key=f"{self.run_id}:",
        )

    def _resume_tree(self, ck: tuple[int, Path] | None) -> Path | None:
        if ck is None:
            return None
        tree = self.run_dir / layout.CLOUD / "resume"
        if tree.exists():
            shutil.rmtree(tree)  # rebuilt for every session; nothing reads it but the bundle
        CheckpointStore(tree).install(ck[1])
        return tree

    def _remote_note(self) -> str | None:
        cur = self.journal.current
        if cur is None or cur.state in SETTLED:
            return None
        return f"session {cur.name} left {cur.state}; the next train on this run picks it up"

    def _poll(self, backend: Backend, cur: Any) -> int | None:
        if self.control.stop and self.control.cancel and not self.journal.data.stop_requested:
            self.journal.data.stop_requested = True
            self.journal.save()
            try:
                backend.stop(cur.remote_ref)
            except ProviderError as exc:
                # Kaggle cannot stop a session: it ends at its budget. Detach now;
                # the next `train` on this run picks the session up.
                return self._reply_stop(remote=str(exc))
        st = backend.status(cur.remote_ref)
        now = self.clock()
        if st.state != cur.remote_state:
            self.emit("cloud_status", backend=cur.backend, session=cur.name, state=st.state, detail=st.detail)
        if st.done:
            # The session's last lines (a short one may end between two polls): shown before the
            # pull, which can take minutes at real size.
            self._forward_live(backend, cur)
            seconds = st.billed_seconds
            if seconds is None:
                start = st.started_ts or cur.created_ts
                seconds = (st.ended_ts or now) - start
            # Real use first (idempotent by key), then the journal: a crash in
            # between re-records the same key, never twice.
            self.ledger.record(f"{self.run_id}:{cur.name}", cur.backend, st.started_ts or cur.created_ts, seconds)
            crash_point("after_record")
            self.journal.transition(st.state, now=now, remote_state=st.state, detail=st.detail, billed_seconds=seconds, ended_ts=now)
            self.emit("quota", backend=cur.backend, used_hours=round(seconds / 3600, 4), budgets=self.ledger.budget_view(now))
            return None
        state = "running" if st.state == "running" else cur.state
        self.journal.transition(state, now=now, remote_state=st.state, detail=st.detail)
        self._forward_live(backend, cur)
        self.wait(self.settings.poll.interval_seconds)
        return None

    def _forward_live(self, backend: Backend, cur: Any) -> None:
        """The running session's progress, as its provider shows it (SageMaker: the job's log).

        Sent as `progress`/`eval` events with `source: "cloud_live"` and the session's name, for
        the display and subscribers only: the run's record stays the session's own events.jsonl,
        merged when the session comes home. Steps only move forward (a session restarted from an
        earlier checkpoint repeats steps; the display must not go back).
        """
        live = getattr(backend, "live_events", None)
        if live is None:
            return
        cursor = self._live_cursors.setdefault(cur.name, {})
        for ev in live(cur.remote_ref, cursor):
            name = ev.pop("event")
            step = ev.get("step")
            if name == "progress":
                if not isinstance(step, int) or step <= self._live_step:
                    continue
                self._live_step = step
            if name == "checkpoint":
                continue  # durable only once verified at home: `checkpoint` events mean that here
            self.emit(name, **ev, source="cloud_live", session=cur.name)

    def _pull_dir(self, name: str) -> Path:
        return self.run_dir / layout.CLOUD / "pulls" / name

    def _pull(self, cur: Any) -> int | None:
        dest = self._pull_dir(cur.name)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.journal.transition(cur.state, now=self.clock(), pull_attempts=cur.pull_attempts + 1)
        try:
            self.backend(cur.backend).pull(cur.remote_ref, dest)
            crash_point("after_pull")
        except ProviderError as exc:
            # Nothing to bring home (e.g. a session killed before it wrote
            # anything): settle it as refused and carry on from what we have.
            self.journal.transition("refused", now=self.clock(), detail=str(exc), pull_attempts=self.settings.poll.pull_retries + 1)
            self.emit("cloud_refused", session=cur.name, ok=False, reason=str(exc))
            return None
        self.journal.transition("pulled", now=self.clock(), pulled_to=str(dest))
        self.emit("cloud_pulled", session=cur.name, path=str(dest))
        return None

    def _verify(self, cur: Any) -> int | None:
        dest = Path(cur.pulled_to)
        check = check_pull(dest)
        if not check.ok:
            # No manifest means the session never finished writing one: pulling
            # again cannot help. A hash or size mismatch may be the transfer.
            attempts = cur.pull_attempts if check.report is not None else self.settings.poll.pull_retries + 1
            self.journal.transition("refused", now=self.clock(), detail=check.reason, pull_attempts=attempts)
            self.emit("cloud_refused", session=cur.name, attempt=cur.pull_attempts, **check.to_event())
            return None
        info = self._install(dest, cur.name)
        self.journal.transition("verified", now=self.clock(), step=info.get("step"), finished=bool(info.get("finished")))
        self.emit("cloud_verified", session=cur.name, step=info.get("step"), finished=bool(info.get("finished")))
        error = info.get("error")
        if isinstance(error, dict) and error.get("final"):
            # The session could not start (no base weights attached): the next one would not either.
            return self._fail(str(error.get("code") or ErrorCode.TRAINER_FAILED), str(error.get("message")), resumable=False)
        if info.get("finished"):
            self.journal.mark_finished(info.get("step"))
        return None

    def _install(self, pulled: Path, session: str) -> dict[str, Any]:
        """Merge a verified session's events; move its checkpoint (and final adapter) into the run directory."""
        run = pulled / "run"
        info: dict[str, Any] = {}
        if (run / layout.SESSION).is_file():
            info = json.loads((run / layout.SESSION).read_text(encoding="utf-8"))
        # Events first: a crash after them re-merges nothing twice (session, seq).
        merge_events(self.run_dir, run, session, self.run_id, int(info.get("events_offset") or 0))
        remote = CheckpointStore(run).latest()
        local = self.local_checkpoint()
        if remote is not None and (local is None or remote.step > local[0]):
            store = CheckpointStore(self.run_dir, keep_last=self.cfg.checkpoint.keep_last)
            point = store.install(remote.path)
            self.emit("checkpoint", step=point.step, path=str(point.path), source="cloud")
        if info.get("finished") and (run / layout.FINAL).is_dir():
            self._install_final(run / layout.FINAL, self.run_dir / layout.FINAL)
        if (run / layout.EVAL).is_dir():
            # Code-evaluation results (eval/<suite>.json), as a local run keeps them.
            self._install_final(run / layout.EVAL, self.run_dir / layout.EVAL)
        return info

    @staticmethod
    def _install_final(src: Path, dst: Path) -> None:
        tmp = dst.with_name(f".{dst.name}.incoming")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        fsync_tree(tmp)
        replace_dir(tmp, dst)

    def _finish(self) -> int:
        if not (self.run_dir / layout.CONFIG).is_file():
            # The artifact manifest reads the strategy (lineage.backend) and base model from it.
            atomic_write_text(self.run_dir / layout.CONFIG, dump_yaml(self.cfg))
        ck = self.local_checkpoint()
        step = self.journal.data.final_step or (ck[0] if ck else None)
        final = self.run_dir / layout.FINAL
        self.emit("finished", **finished_fields(step=step, final=str(final) if final.is_dir() else None, source="cloud"))
        if self.control.stop_reply is not None:
            self.control.stop_reply({"step": step, "checkpoint": str(ck[1]) if ck else None})
        return ExitCode.OK

    def _reply_stop(self, remote: str | None = None) -> int:
        ck = self.local_checkpoint()
        if self.control.stop_reply is not None:
            result: dict[str, Any] = {"step": ck[0] if ck else 0, "checkpoint": str(ck[1]) if ck else None}
            if remote:
                result["remote"] = remote
            self.control.stop_reply(result)
        return ExitCode.RESUMABLE

    def _fail(self, code: str, message: str, *, resumable: bool = True) -> int:
        """`resumable`: the journal holds the run, so the same `train` may pick it up
        again; false when a retry cannot help (a missing SDK, a refusal, a limit reached)."""
        cur = self.journal.current
        if cur is not None and cur.state == "submitting":
            self.ledger.release(f"{self.run_id}:{cur.name}")  # never ran: give the hours back
        self.emit("failed", **failed_fields(code, message, resumable=resumable))
        return ExitCode.CRASH
