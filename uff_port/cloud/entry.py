"""The remote session's entry point: `python -m uff_port.cloud.entry`.

The same program runs in a Kaggle kernel, a SageMaker job, or by hand:

1. detect the platform and map its directories onto one run directory;
2. restore the previous session's checkpoint (Kaggle: from the bundle's
   `resume/`; SageMaker restores /opt/ml/checkpoints from S3 by itself);
3. run the ordinary trainer (`python -m uff_port.training`) with
   `training.max_runtime` = session budget - safety margin - time already gone,
   forwarding SIGTERM (SageMaker: SIGTERM, then SIGKILL 120 s later);
4. write `session.json` and the output manifest that the pull verifies.

Exit status: 0 when the session ended well (finished *or* stopped with a
durable checkpoint: for the provider both are success, and a non-zero exit
could discard outputs); the trainer's status otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Final

import yaml

from uff_port.cloud.bundle import INIT_ADAPTER_FILES
from uff_port.cloud.corpus import (
    CORPUS_PREFIX,
    CorpusError,
    data_fields,
    field_items,
    find_piece,
    open_piece,
    set_field,
)
from uff_port.cloud.credentials import CORPUS_KEY_ENV
from uff_port.cloud.environment import (
    BUNDLE_MARKER,
    KAGGLE_ROOT_ENV,
    SM_MODEL_CHANNEL,
    Platform,
    PlatformError,
    detect,
    sm_channel,
)
from uff_port.cloud.verify import write_output_manifest
from uff_port.cloud.weights import MODEL_NOT_FOUND, resolve_in_job, what_to_attach
from uff_port.core import layout
from uff_port.core.checkpoint_store import CheckpointStore
from uff_port.core.exits import ExitCode
from uff_port.fsutil import atomic_write_json
from uff_port.hashing import sha256_file
from uff_port.protocol import failed_fields

DEFAULT_MARGIN: Final = 60.0
SM_KILL_AFTER: Final = 120.0
_KILL_SLACK: Final = 15.0
MAX_RESTARTS: Final = 3
"""Restarts in a row that bring no new checkpoint before the session gives up."""
PAYLOAD_NAME: Final = "payload.tar"
# The session's clock starts when the kernel script started (before any pip
# install), not when this module was imported.
_STARTED = time.monotonic() - max(0.0, time.time() - float(os.environ.get("UFF_PORT_SESSION_T0", time.time())))


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar refusing absolute paths, `..`, links and devices."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise PlatformError(f"{archive.name}: unsafe member {member.name!r}")
        tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)


def _materialize(platform: Platform) -> Platform:
    """A Kaggle bundle ships data/ and resume/ inside payload.tar: unpack to a writable place."""
    payload = platform.bundle_dir / PAYLOAD_NAME
    if not payload.is_file():
        return platform
    dest = Path(tempfile.mkdtemp(prefix="uff-bundle-"))
    for item in platform.bundle_dir.iterdir():
        if item.is_file() and item.name != PAYLOAD_NAME:
            shutil.copyfile(item, dest / item.name)
    safe_extract(payload, dest)
    return dataclasses.replace(platform, bundle_dir=dest)


def _session_config(platform: Platform, budget: float | None, margin: float) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = json.loads((platform.bundle_dir / BUNDLE_MARKER).read_text(encoding="utf-8"))
    cfg = yaml.safe_load((platform.bundle_dir / meta.get("config", "config.yaml")).read_text(encoding="utf-8"))
    for section, key in data_fields(cfg):  # data.path, and the RL stage's tasks file and SFT corpus
        set_field(cfg, section, key, [
            p if p.startswith(("builtin:", CORPUS_PREFIX)) or Path(p).is_absolute() else str(platform.bundle_dir / p)
            for p in field_items(cfg, section, key)])
    _map_init_adapter(platform, cfg)
    if budget is not None:
        left = budget - margin - (time.monotonic() - _STARTED)
        cfg.setdefault("training", {})["max_runtime"] = max(1.0, left)
    # Inside the job the trainer *is* the local run of the cloud strategy.
    cfg["strategy"] = "local"
    return meta, cfg


def _map_init_adapter(platform: Platform, cfg: dict[str, Any]) -> None:
    """Point model.init_adapter at the weights the bundle carries (uff_port.cloud.bundle).

    Checkpoints bind model.init_adapter, so every session of a run must name the same
    path: a Kaggle bundle is unpacked somewhere new each time, so the weights are copied
    to a directory named by their content under the temporary directory.
    """
    model = cfg.get("model") or {}
    rel = model.get("init_adapter")
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return
    src = platform.bundle_dir / rel
    weights = src / INIT_ADAPTER_FILES[0]
    if not weights.is_file():
        return  # the trainer refuses it, naming model.init_adapter
    dest = Path(tempfile.gettempdir()) / f"uff-init-adapter-{sha256_file(weights)[:16]}"
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".uff-init-adapter-"))
        for item in src.iterdir():
            if item.is_file():
                shutil.copyfile(item, tmp / item.name)
        try:
            os.replace(tmp, dest)
        except OSError:  # another session of this machine put the same weights there first
            shutil.rmtree(tmp, ignore_errors=True)
    model["init_adapter"] = str(dest)


def sm_hosts() -> tuple[list[str], str] | None:
    """SageMaker's hosts of this job and which one we are (SM_HOSTS/SM_CURRENT_HOST or resourceconfig.json)."""
    if os.environ.get("SM_HOSTS") and os.environ.get("SM_CURRENT_HOST"):
        return list(json.loads(os.environ["SM_HOSTS"])), os.environ["SM_CURRENT_HOST"]
    path = Path(os.environ.get("UFF_PORT_SM_ROOT", "/opt/ml")) / "input" / "config" / "resourceconfig.json"
    if path.is_file():
        rc = json.loads(path.read_text(encoding="utf-8"))
        return list(rc["hosts"]), str(rc["current_host"])
    return None


def _map_hosts(platform: Platform, cfg: dict[str, Any]) -> bool:
    """InstanceCount > 1: torchrun across the hosts, node 0 = the first host. True on the primary host.

    The node's rank and the address travel in the environment, so every host's
    config.yaml is the same file (CheckpointConfig syncs the run from each host).
    """
    hosts = sm_hosts() if platform.kind == "sagemaker" else None
    if not hosts or len(hosts[0]) <= 1:
        return True
    names, current = sorted(hosts[0]), hosts[1]
    dist = cfg.setdefault("distributed", {})
    dist["nnodes"] = len(names)
    dist.setdefault("master_port", 29500)
    os.environ["UFF_PORT_NODE_RANK"] = str(names.index(current))
    os.environ["UFF_PORT_MASTER_ADDR"] = names[0]
    return names.index(current) == 0


def _input_roots(platform: Platform) -> list[Path]:
    """Where the provider mounts the session's inputs (the base weights among them)."""
    if platform.kind == "kaggle":
        return [Path(os.environ.get(KAGGLE_ROOT_ENV, "/kaggle")) / "input"]
    if platform.kind == "sagemaker":
        return [sm_channel(SM_MODEL_CHANNEL)]
    return [platform.bundle_dir]


def _map_model(platform: Platform, meta: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """Point model.name_or_path at the weights the provider brought; the reason when it brought none."""
    model_meta = meta.get("model")
    if not model_meta:
        return None
    found = resolve_in_job(model_meta, platform.kind, _input_roots(platform))
    if found is None:
        return what_to_attach(model_meta, platform.kind)
    model = cfg.setdefault("model", {})
    model["name_or_path"], model["local_files_only"] = found
    return None


def _corpus_key(platform: Platform) -> bytes | None:
    """The corpus key as the job gets it: the environment (set from a Kaggle secret), else Secrets Manager."""
    import base64

    raw = os.environ.get(CORPUS_KEY_ENV)
    secret_id = platform.hyperparameters.get("uff_corpus_secret")
    if not raw and secret_id:
        import boto3

        raw = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"]
    return base64.b64decode(raw) if raw else None


def _map_corpus(platform: Platform, meta: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """Point `corpus:` data paths at the mounted corpus piece (opened on private disk); the reason when it cannot."""
    corpus = meta.get("corpus")
    if not corpus:
        return None
    if platform.kind == "kaggle":
        roots = [Path(os.environ.get(KAGGLE_ROOT_ENV, "/kaggle")) / "input"]
    elif platform.kind == "sagemaker":
        roots = [sm_channel("corpus")]
    else:
        roots = [platform.bundle_dir]
    piece = find_piece(roots, str(corpus["address"]))
    if piece is None:
        return f"the corpus {corpus['address']} is not attached (Kaggle: dataset uff-port-corpus-{corpus['address']}; SageMaker: channel corpus)"
    try:
        # Not under the output tree: the plain corpus never becomes a session output.
        opened = open_piece(piece, corpus, _corpus_key(platform) if corpus.get("encrypted") else None,
                            Path(tempfile.mkdtemp(prefix="uff-corpus-")))
    except CorpusError as exc:
        return str(exc)
    for section, key in data_fields(cfg):
        set_field(cfg, section, key, [opened[p[len(CORPUS_PREFIX):]] if p.startswith(CORPUS_PREFIX) else p
                                      for p in field_items(cfg, section, key)])
    return None


def _events_offset(run_dir: Path, session: str | None) -> int:
    """Where this session's events start in events.jsonl, fixed at its first start.

    SageMaker restores the run directory (events included) at every start, so a
    spot restart of the same session must not move the mark.
    """
    marks_path = run_dir / ".uff-session-offsets.json"
    marks = json.loads(marks_path.read_text(encoding="utf-8")) if marks_path.is_file() else {}
    key = session or "?"
    if key not in marks:
        events = run_dir / "events.jsonl"
        marks[key] = events.stat().st_size if events.is_file() else 0
        atomic_write_json(marks_path, marks)
    return int(marks[key])


def _refuse_session(platform: Platform, meta: dict[str, Any], session: str | None, code: str, message: str) -> int:
    """A session that cannot start: the reason goes home in events.jsonl and session.json."""
    from uff_port.training.reporting import Reporter

    Reporter(platform.run_dir).emit("failed", **failed_fields(code, message, resumable=False))
    step = _latest_step(platform.run_dir)
    info = {"session": session or meta.get("session"), "run_id": meta.get("run_id"), "platform": platform.kind,
            "rc": int(ExitCode.REFUSED), "start_step": step, "step": step, "finished": False,
            "events_offset": _events_offset(platform.run_dir, session or meta.get("session")),
            "error": {"code": code, "message": message, "final": True}}
    atomic_write_json(platform.run_dir / layout.SESSION, info)
    if platform.kind == "sagemaker":
        _copy_run_to_model_dir(platform)
    write_output_manifest(platform.output_dir, session=info["session"], step=step, finished=False,
                          rc=ExitCode.REFUSED)
    print(f"uff-port entry: {code}: {message}", file=sys.stderr, flush=True)
    return ExitCode.REFUSED


def _restore_resume(platform: Platform) -> None:
    """Seed the run's checkpoints from the bundle, unless the run already has a newer one.

    On SageMaker /opt/ml/checkpoints comes back from S3 by itself; the bundle's
    checkpoint wins only when it is newer (another backend got further).
    """
    src = platform.bundle_dir / "resume"
    if not src.is_dir():
        return
    ours = CheckpointStore(platform.run_dir).latest()
    bundled = CheckpointStore(src).latest()
    if bundled is None or (ours is not None and ours.step >= bundled.step):
        return
    CheckpointStore(platform.run_dir).install(bundled.path)


def _copy_run_to_model_dir(platform: Platform) -> None:
    """SageMaker tars only the model dir: put the run's results (not every checkpoint) there."""
    out = platform.output_dir / "run"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in (layout.CONFIG, layout.EVENTS, layout.SESSION):
        if (platform.run_dir / name).is_file():
            shutil.copyfile(platform.run_dir / name, out / name)
    for name in (layout.FINAL, layout.EVAL):  # eval/<suite>.json: the code-evaluation results
        if (platform.run_dir / name).is_dir():
            shutil.copytree(platform.run_dir / name, out / name)
    latest = CheckpointStore(platform.run_dir).latest()
    if latest is not None:
        CheckpointStore(out).install(latest.path)


def _secondary_node(platform: Platform, cfg: dict[str, Any]) -> int:
    """Another host of a multi-instance job: run its ranks, write nothing the primary host writes."""
    meta = json.loads((platform.bundle_dir / BUNDLE_MARKER).read_text(encoding="utf-8"))
    missing = _map_model(platform, meta, cfg) or _map_corpus(platform, meta, cfg)
    if missing is not None:
        print(f"uff-port entry: {missing}", file=sys.stderr)
        return ExitCode.REFUSED
    tmp = Path(tempfile.mkdtemp(prefix="uff-node-"))
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    rc = subprocess.call([sys.executable, "-m", "uff_port.training", "--run-dir", str(platform.run_dir),
                          "--config", str(cfg_path)])
    return ExitCode.OK if rc in (ExitCode.OK, ExitCode.RESUMABLE) else rc


LIVE_PREFIX: Final = "uff-port live "
"""Marks the lines of the session's log that carry an event: the provider's log stream
(SageMaker: CloudWatch Logs) is the only live channel home while a session runs."""
LIVE_EVENTS: Final = {"progress": ("step", "max_steps", "loss", "lr", "tokens_per_s"),
                      "eval": ("step", "loss", "suite", "pass@1"),
                      "checkpoint": ("step",)}
_LIVE_LINE_MAX: Final = 64 * 1024


class LiveEcho:
    """Copies a few fields of the trainer's progress/eval/checkpoint events to stdout, as they are
    appended to events.jsonl, so the home side can show the session's progress from its log.

    Only numbers and names from a fixed list leave: never a message, a path or a config value,
    so nothing the trainer logs can leak into the provider's log service through here.
    """

    def __init__(self, events: Path, offset: int, out: IO[str] | None = None) -> None:
        self.events, self.offset, self.out = events, offset, out or sys.stdout
        self._partial = b""

    def poll(self) -> int:
        try:
            with open(self.events, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(1 << 20)
        except OSError:
            return 0
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-_LIVE_LINE_MAX:]  # an unfinished line waits for its end
        sent = 0
        for raw in lines:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            fields = LIVE_EVENTS.get(str(ev.get("event"))) if isinstance(ev, dict) else None
            if fields is None:
                continue
            live = {"event": ev["event"], **{k: ev[k] for k in fields if isinstance(ev.get(k), (int, float, str))}}
            if isinstance(live.get("suite"), str) and len(live["suite"]) > 64:
                del live["suite"]
            print(LIVE_PREFIX + json.dumps(live, separators=(",", ":")), file=self.out, flush=True)
            sent += 1
        return sent


def parse_live_line(line: str) -> dict[str, Any] | None:
    """An event echoed by LiveEcho, or None for any other log line (or a forged, malformed one)."""
    _, sep, body = line.partition(LIVE_PREFIX)
    if not sep or len(body) > _LIVE_LINE_MAX:
        return None
    try:
        ev = json.loads(body)
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("event") not in LIVE_EVENTS:
        return None
    fields = LIVE_EVENTS[ev["event"]]
    out = {k: ev[k] for k in fields if isinstance(ev.get(k), (int, float, str)) and not isinstance(ev.get(k), bool)}
    if not isinstance(out.get("step"), int):
        return None
    return {"event": ev["event"], **out}


def _latest_step(run_dir: Path) -> int:
    point = CheckpointStore(run_dir).latest()
    return point.step if point else 0


def run_session(platform: Platform, margin: float, session: str | None) -> int:
    platform = _materialize(platform)
    budget = platform.budget_seconds
    meta, cfg = _session_config(platform, budget, margin)
    primary = _map_hosts(platform, cfg)
    if not primary:
        return _secondary_node(platform, cfg)
    _restore_resume(platform)
    offset = _events_offset(platform.run_dir, session or meta.get("session"))
    missing = _map_model(platform, meta, cfg)
    if missing is not None:
        return _refuse_session(platform, meta, session, MODEL_NOT_FOUND, missing)
    unreadable = _map_corpus(platform, meta, cfg)
    if unreadable is not None:
        return _refuse_session(platform, meta, session, "invalid_config", unreadable)
    start_step = _latest_step(platform.run_dir)
    tmp = Path(tempfile.mkdtemp(prefix="uff-session-"))
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "uff_port.training", "--run-dir", str(platform.run_dir), "--config", str(cfg_path)]
    term_at: list[float] = []
    children: list[subprocess.Popen[bytes]] = []

    def on_term(signum: int, _frame: Any) -> None:
        if not term_at:
            term_at.append(time.monotonic())
            try:
                os.killpg(children[-1].pid, signal.SIGTERM)
            except (ProcessLookupError, IndexError):
                pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # The trainer's max_runtime counts from the end of its model load; the
    # provider's limit counts from the session's start. So we also hold the
    # hard line ourselves: SIGTERM at budget - margin, SIGKILL before the end.
    deadline = None if budget is None else _STARTED + budget - margin
    own_grace = max(1.0, margin - min(_KILL_SLACK, margin * 0.25))
    kill_after = float(os.environ.get("UFF_PORT_KILL_AFTER", SM_KILL_AFTER))
    provider_grace = kill_after - min(_KILL_SLACK, kill_after * 0.25)
    self_stopped = False
    restarts = stalled = 0
    events_path = platform.run_dir / layout.EVENTS
    echo = LiveEcho(events_path, events_path.stat().st_size if events_path.is_file() else 0)
    while True:
        launched_at = _latest_step(platform.run_dir)
        # Own process group: the provider's SIGTERM reaches us, and we decide how
        # the trainer hears of it (once, with a deadline), so it is never killed twice.
        children.append(subprocess.Popen(cmd, start_new_session=True))
        child = children[-1]
        while True:
            try:
                rc = child.wait(timeout=0.25)
                echo.poll()
                break
            except subprocess.TimeoutExpired:
                echo.poll()
                now = time.monotonic()
                if deadline is not None and not term_at and now >= deadline:
                    self_stopped = True
                    on_term(signal.SIGTERM, None)
                grace = own_grace if self_stopped else provider_grace
                if term_at and now - term_at[0] > grace:
                    # Out of time: the manifest below must still be written.
                    os.killpg(child.pid, signal.SIGKILL)
        left = None if deadline is None else deadline - time.monotonic()
        # A trainer killed from outside (OOM killer, a driver crash) while the
        # session still has time: start it again, it resumes from its last
        # checkpoint instead of wasting the rest of a 9 h session.
        progressed = _latest_step(platform.run_dir) > launched_at
        stalled = 0 if progressed else stalled + 1
        if rc < 0 and not term_at and stalled < MAX_RESTARTS and (left is None or left > 2 * margin):
            restarts += 1
            print(f"uff-port entry: trainer died of signal {-rc}; restart {restarts}", file=sys.stderr, flush=True)
            continue
        break
    shutil.rmtree(tmp, ignore_errors=True)
    step = _latest_step(platform.run_dir)
    finished = (platform.run_dir / layout.FINAL).is_dir() and rc == ExitCode.OK
    info = {
        "session": session or meta.get("session"),
        "run_id": meta.get("run_id"),
        "platform": platform.kind,
        "rc": rc,
        "start_step": start_step,
        "step": step,
        "finished": finished,
        "signalled": bool(term_at) and not self_stopped,
        # Cut off by the session budget: our own SIGTERM, or the trainer's
        # max_runtime (exit 75 with nobody having signalled it).
        "budget_stop": self_stopped or (rc == ExitCode.RESUMABLE and not term_at),
        "restarts": restarts,
        "events_offset": offset,
        "seconds": round(time.monotonic() - _STARTED, 3),
    }
    atomic_write_json(platform.run_dir / layout.SESSION, info)
    if platform.kind == "sagemaker":
        _copy_run_to_model_dir(platform)
    write_output_manifest(platform.output_dir, session=info["session"], step=step, finished=finished, rc=rc)
    if rc in (ExitCode.OK, ExitCode.RESUMABLE) or self_stopped:
        # A stop at the budget is the plan, even if the trainer had to be
        # killed: what it made durable is in the manifest and verifies.
        return ExitCode.OK
    if platform.kind == "sagemaker":
        failure = Path(os.environ.get("UFF_PORT_SM_ROOT", "/opt/ml")) / "output" / "failure"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(f"trainer exited {rc}\n", encoding="utf-8")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uff_port.cloud.entry", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=None, help="session wall-clock budget")
    parser.add_argument("--margin-seconds", type=float, default=DEFAULT_MARGIN, help="stop this long before it")
    parser.add_argument("--run-dir", default=None, help="override the mapped run directory")
    parser.add_argument("--session", default=None)
    args = parser.parse_args(argv)
    try:
        platform = detect(args.budget_seconds, args.run_dir)
    except PlatformError as exc:
        print(f"uff-port entry: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    hps = platform.hyperparameters
    margin = float(hps.get("uff_margin", args.margin_seconds))
    session = args.session or hps.get("uff_session")
    return run_session(platform, margin, session)


if __name__ == "__main__":
    sys.exit(main())
