"""Build an artifact manifest from a finished run directory.

The worker calls `write_run_manifest` when a job finishes, so it must be fast
and must not fail on missing optional pieces: a run without eval events, a
config that no longer validates or a torn last line in events.jsonl still gets
a manifest; only a missing `final/` adapter is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Final

from uff_port import __version__
from uff_port.core import layout
from uff_port.core.config_io import ConfigLimitError, load_yaml_file
from uff_port.eval.metrics import suite_metrics
from uff_port.fsutil import UnsafePath, atomic_write_text, find_symlinks, open_confined
from uff_port.hashing import list_files, sha256_file, tree_manifest
from uff_port.registry.errors import NOT_FOUND, UNSAFE_PATH, RegistryError
from uff_port.registry.manifest import (
    INTERFACE_CONTRACT,
    MANIFEST_NAME,
    ArtifactManifest,
    artifact_id,
    load_manifest,
    parse_manifest,
)

TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# Written next to the adapter by other tools; metadata about the files, not the artifact.
_NOT_CONTENT: Final = (MANIFEST_NAME, "manifest.json")
_DERIVED_DIRS: Final = ("merged/",)
"""A merged full model (output.merge) is derived from base + adapter: not part of the artifact."""
# Bookkeeping fields of events that are not metrics.
_NOT_METRICS: Final = {"event", "ts", "seq", "job_id", "step", "max_steps", "pid", "attempt"}
_DATASET_HASH_LIMIT: Final = 4 << 30
"""Above this many bytes the dataset is not re-hashed at finish (the trainer should report it)."""
_START_STATES: Final = {"loading", "starting"}
"""A trainer's first `state` event: one per trainer start (fresh, resumed or restarted)."""


def content_excludes(directory: Path) -> list[str]:
    """Paths under an artifact directory that are not artifact content."""
    return [*_NOT_CONTENT, *(p for p in list_files(directory) if p.startswith(_DERIVED_DIRS))]


def tokenizer_hash(directory: Path) -> str | None:
    """sha256 over the tokenizer files present (same line format as artifact ids)."""
    files = {n: {"sha256": sha256_file(directory / n)} for n in TOKENIZER_FILES if (directory / n).is_file()}
    return artifact_id(files) if files else None


def _read_events(path: Path) -> list[dict[str, Any]]:
    """Events worth reading; progress/heartbeat lines (the bulk) are skipped unparsed."""
    out: list[dict[str, Any]] = []
    try:
        fh = open_confined(path.parent, path, "rb")
    except (OSError, UnsafePath):  # a symlink planted as events.jsonl is not read through
        return out
    with fh:
        for raw in fh:
            line = raw.decode("utf-8", "replace")
            if '"progress"' in line or '"heartbeat"' in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a crash can tear the last line; it is not worth failing for
            if isinstance(ev, dict) and isinstance(ev.get("event"), str):
                out.append(ev)
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def metrics_from_events(events: list[dict[str, Any]]) -> dict[str, float | None]:
    """Numbers of the last `eval` (loss -> eval_loss) and last `finished` (loss -> train_loss).

    Applied in file order, so whichever of the two came later wins a shared key.
    """
    renames = {"eval": {"loss": "eval_loss"}, "finished": {"loss": "train_loss"}}
    last: dict[str, int] = {}
    for i, ev in enumerate(events):
        if ev["event"] in renames:
            last[ev["event"]] = i
    out: dict[str, float | None] = {}
    for i in sorted(last.values()):
        ev = events[i]
        for key, value in ev.items():
            if key in _NOT_METRICS:
                continue
            num = _number(value)
            if num is not None:  # strings and nulls (paths, NaN sent as nil) are not metrics
                out[renames[ev["event"]].get(key, key)] = num
    return out


def attempts_from_events(events: list[dict[str, Any]]) -> int:
    """Trainer starts: distinct `attempt` values, else `state: starting` events, else pids."""
    attempts = {e["attempt"] for e in events if isinstance(e.get("attempt"), int)}
    if attempts:
        return len(attempts)
    starts = sum(1 for e in events if e["event"] == "state" and e.get("state") in _START_STATES)
    if starts:
        return starts
    pids = {e["pid"] for e in events if e["event"] != "hello" and isinstance(e.get("pid"), int)}
    return max(1, len(pids))


def sessions_from_events(events: list[dict[str, Any]]) -> list[str]:
    """Cloud sessions in the order their events were merged (events_merge tags each line)."""
    seen: dict[str, None] = {}
    for e in events:
        if isinstance(e.get("session"), str) and isinstance(e.get("seq"), int):
            seen.setdefault(e["session"], None)
    return list(seen)


def _dataset_hash(cfg: dict[str, Any], events: list[dict[str, Any]], run_dir: Path) -> str | None:
    for ev in reversed(events):
        value = ev.get("dataset_hash")
        if isinstance(value, str) and len(value) == 64:
            return value.lower()
    paths = (cfg.get("data") or {}).get("path")
    if paths is None:
        return None
    paths = [paths] if isinstance(paths, str) else [str(p) for p in paths]
    h = hashlib.sha256()
    total = 0
    for entry in paths:
        if entry.startswith("builtin:"):
            h.update(f"{hashlib.sha256(entry.encode()).hexdigest()}  {entry}\n".encode())
            continue
        candidates = [Path(entry), run_dir / entry]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            return None  # cannot vouch for data we cannot read
        total += found.stat().st_size
        if total > _DATASET_HASH_LIMIT:
            return None
        h.update(f"{sha256_file(found)}  {Path(entry).name}\n".encode())
    return h.hexdigest()


def _config(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The run's config map and its hash (`config_hash` when it validates, else file bytes)."""
    path = run_dir / layout.CONFIG
    try:
        text = path.read_text(encoding="utf-8")
        raw = load_yaml_file(path, "config.yaml")
    except (OSError, ConfigLimitError):
        return {}, None
    if not isinstance(raw, dict):
        return {}, hashlib.sha256(text.encode()).hexdigest()
    from uff_port.core.config import ConfigError, config_hash, validate_config

    try:
        cfg = validate_config(raw)
    except ConfigError:
        return raw, hashlib.sha256(text.encode()).hexdigest()
    return cfg.to_dict(), config_hash(cfg)


def _interface(final: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        adapter = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"contract": INTERFACE_CONTRACT, "kind": "full", "task_type": "CAUSAL_LM"}, {}
    if not isinstance(adapter, dict):
        adapter = {}
    modules = adapter.get("target_modules") or []
    if isinstance(modules, str):
        modules = [modules]
    r = adapter.get("r")
    return {
        "contract": INTERFACE_CONTRACT,
        "kind": str(adapter.get("peft_type", "lora")).lower(),
        "task_type": str(adapter.get("task_type") or "CAUSAL_LM"),
        "target_modules": sorted(str(m) for m in modules),
        "r": r if isinstance(r, int) and r > 0 else None,
    }, adapter


def _default_role(cfg: dict[str, Any]) -> str:
    managers = (cfg.get("data") or {}).get("managers") or []
    return managers[0] if len(managers) == 1 else "textgen"


def refuse_symlinks(artifact_dir: Path) -> None:
    """`unsafe_path` if the artifact directory is, or holds, a symlink.

    An artifact is its own bytes: a link would make us hash and copy into the
    registry whatever file it points at, anywhere on the machine.
    """
    links = ["."] if artifact_dir.is_symlink() else (find_symlinks(artifact_dir) if artifact_dir.is_dir() else [])
    if links:
        raise RegistryError(
            UNSAFE_PATH,
            f"{artifact_dir}: holds symlinks, which are never followed or copied: {', '.join(links[:5])}",
            {"path": str(artifact_dir), "symlinks": links[:20]},
        )


def _parent(init_adapter: object) -> str | None:
    """The artifact a run's adapter started from: its id when the directory has a manifest."""
    if not isinstance(init_adapter, str) or not init_adapter:
        return None
    try:
        raw = json.loads((Path(init_adapter) / "artifact.json").read_text(encoding="utf-8"))
        if isinstance(raw, dict) and isinstance(raw.get("artifact_id"), str):
            return raw["artifact_id"]
    except (OSError, ValueError):
        pass
    return init_adapter


def build_manifest(
    artifact_dir: Path,
    *,
    run_dir: Path | None = None,
    role: str | None = None,
    version: str = "0.1.0",
    name: str | None = None,
    created_at: str | None = None,
    base_model: str | None = None,
) -> ArtifactManifest:
    """Hash `artifact_dir` and gather its metadata (from `run_dir` when there is one)."""
    run_dir = run_dir or artifact_dir.parent
    refuse_symlinks(artifact_dir)
    if not artifact_dir.is_dir():
        raise RegistryError(NOT_FOUND, f"run_dir: no adapter directory at {artifact_dir}")
    files = tree_manifest(artifact_dir, exclude=content_excludes(artifact_dir))
    if not files:
        raise RegistryError(NOT_FOUND, f"run_dir: {artifact_dir} holds no files")
    cfg, cfg_hash = _config(run_dir)
    events = _read_events(run_dir / layout.EVENTS)
    interface, adapter = _interface(artifact_dir)
    model_cfg = cfg.get("model") or {}
    base_id = base_model or model_cfg.get("name_or_path") or adapter.get("base_model_name_or_path")
    revision = model_cfg.get("revision") or adapter.get("revision")
    job_id = next((e["job_id"] for e in reversed(events) if isinstance(e.get("job_id"), str)), None)
    final_step = next((e["step"] for e in reversed(events) if isinstance(e.get("step"), int)), None)
    raw = {
        "schema_version": 1,
        "artifact_id": artifact_id(files),
        "name": name or str(cfg.get("name") or run_dir.name),
        "role": role or _default_role(cfg),
        "version": version,
        "files": files,
        "base_model": {"id": str(base_id or "unknown"), "revision": revision},
        "tokenizer_hash": tokenizer_hash(artifact_dir),
        "dataset_hash": _dataset_hash(cfg, events, run_dir),
        "config_hash": cfg_hash,
        "code_version": f"uff-port {__version__}",
        "lineage": {
            "run_id": job_id or run_dir.name,
            "attempts": attempts_from_events(events),
            "backend": str(cfg.get("strategy") or "local"),
            "final_step": final_step if final_step is None or final_step >= 0 else None,
            "sessions": sessions_from_events(events),
            "parent": _parent(model_cfg.get("init_adapter")),
        },
        "metrics": {**metrics_from_events(events), **suite_metrics(run_dir)},
        "interface": interface,
        "created_at": created_at,
    }
    return parse_manifest(raw)


def write_run_manifest(
    run_dir: str | Path,
    *,
    role: str | None = None,
    version: str = "0.1.0",
    name: str | None = None,
    created_at: str | None = None,
) -> Path:
    """Write `RUN_DIR/final/artifact.json` for a finished run and return its path.

    Atomic (temp + fsync + rename), so a crash mid-write never leaves a
    manifest that a later `register` would half-read.
    """
    run = Path(run_dir)
    final = run / layout.FINAL
    manifest = build_manifest(
        final, run_dir=run, role=role, version=version, name=name, created_at=created_at
    )
    out = final / MANIFEST_NAME
    # The trainer's export replaces final/ whole, so a manifest already there describes this
    # very export (a finished run reported again): kept byte for byte unless asked to restate it.
    defaults = role is None and version == "0.1.0" and name is None and created_at is None
    try:
        if defaults and not out.is_symlink() and load_manifest(out).artifact_id == manifest.artifact_id:
            return out
    except (RegistryError, OSError):
        pass
    atomic_write_text(out, manifest.to_json())
    return out
