"""The upload bundle: what one remote session needs, and nothing private.

Layout (the same for a Kaggle dataset version and a SageMaker channel):

    uff-bundle.json     run id, session name, config and data paths, wheel name
    config.yaml         the run's config, data paths made bundle-relative
    data/NN-name.jsonl  the corpus (data.path; with stage rl also rl.sft_path and a tasks file
                        named by rl.prompts)
    data/init-adapter/  the LoRA weights model.init_adapter names (a parent or the SFT stage's
                        adapter), which exist only on this machine
    uff_port-*.whl      this package (`pip wheel --no-deps .`)
    resume/             the previous session's verified checkpoint (chaining)

Every file is scanned before upload: credential files are refused by name and
every known credential value by content (wheels are scanned member by member).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Final

import yaml

from uff_port import __version__
from uff_port.cloud.corpus import CORPUS_PREFIX, data_fields, field_items, set_field
from uff_port.cloud.credentials import is_secret_file, known_secrets
from uff_port.cloud.environment import BUNDLE_MARKER
from uff_port.fsutil import atomic_write_json, atomic_write_text

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
WHEEL_ENV: Final = "UFF_PORT_WHEEL"
INIT_ADAPTER_DIR: Final = "data/init-adapter"
"""Where the bundle carries model.init_adapter (under data/: a Kaggle bundle ships data/ in its payload)."""
INIT_ADAPTER_FILES: Final = ("adapter_model.safetensors", "adapter_config.json")


class BundleError(Exception):
    """The bundle cannot be built safely (a secret inside, a missing data file)."""


def build_wheel(cache_dir: Path) -> Path:
    """A wheel of this package; `UFF_PORT_WHEEL` names a prebuilt one."""
    import os

    if os.environ.get(WHEEL_ENV):
        wheel = Path(os.environ[WHEEL_ENV])
        if not wheel.is_file():
            raise BundleError(f"{WHEEL_ENV}: no such file {wheel}")
        return wheel
    cached = sorted(cache_dir.glob(f"uff_port-{__version__}-*.whl"))
    if cached:
        return cached[-1]
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise BundleError(f"uff-port is not installed from a source tree: build a wheel and set {WHEEL_ENV}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(cache_dir), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    built = sorted(cache_dir.glob(f"uff_port-{__version__}-*.whl"))
    if proc.returncode != 0 or not built:
        raise BundleError(f"pip wheel failed: {proc.stderr[-2000:]}")
    return built[-1]


def data_files(cfg: dict[str, Any], base: Path) -> list[Path]:
    """The corpus files on this machine (builtin corpora are built inside the job)."""
    return [Path(p) for p in _data_files(cfg, base) if not p.startswith("builtin:")]


def _data_files(cfg: dict[str, Any], base: Path) -> list[str]:
    return [p for section, key in data_fields(cfg) for p in _field_files(cfg, section, key, base)]


def _field_files(cfg: dict[str, Any], section: str, key: str, base: Path) -> list[str]:
    out = []
    for item in field_items(cfg, section, key):
        if item.startswith("builtin:"):
            out.append(item)
            continue
        p = Path(item)
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise BundleError(f"{section}.{key}: no such file {item!r}")
        out.append(str(p))
    return out


def build_bundle(
    dest: Path,
    cfg: dict[str, Any],
    *,
    run_id: str,
    session: str,
    wheel: Path | None,
    resume_from: Path | None = None,
    data_base: Path | None = None,
    model: dict[str, Any] | None = None,
    corpus: dict[str, Any] | None = None,
    secrets: list[str] | None = None,
) -> dict[str, Any]:
    """`corpus`: the staged corpus piece's meta (uff_port.cloud.corpus): its files are named, not copied."""
    """Write a bundle into `dest` (emptied first); returns its uff-bundle.json."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "data").mkdir(parents=True)
    cfg = json.loads(json.dumps(cfg))
    local_files = i = 0
    for section, key in data_fields(cfg):
        remote_paths = []
        for src in _field_files(cfg, section, key, data_base or Path.cwd()):
            i += 1
            if src.startswith("builtin:"):
                remote_paths.append(src)
                continue
            if corpus is not None:
                remote_paths.append(CORPUS_PREFIX + corpus["files"][local_files])
                local_files += 1
                continue
            name = f"data/{i - 1:02d}-{Path(src).name}"
            if is_secret_file(Path(src).name):
                raise BundleError(f"{section}.{key}: refusing to upload credential file {Path(src).name}")
            shutil.copyfile(src, dest / name)
            remote_paths.append(name)
        set_field(cfg, section, key, remote_paths)
    _carry_init_adapter(dest, cfg, data_base or Path.cwd())
    atomic_write_text(dest / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    wheel_name = None
    if wheel is not None:
        wheel_name = wheel.name
        shutil.copyfile(wheel, dest / wheel_name)
    if resume_from is not None and resume_from.is_dir():
        shutil.copytree(resume_from, dest / "resume")
    meta = {
        "version": 1,
        "uff_port": __version__,
        "run_id": run_id,
        "session": session,
        "config": "config.yaml",
        "wheel": wheel_name,
        "resume": (dest / "resume").is_dir(),
        # Where the job finds the base weights (uff_port.cloud.weights); never a local path.
        "model": model,
        "corpus": corpus,
    }
    atomic_write_json(dest / BUNDLE_MARKER, meta)
    scan_for_secrets(dest, None if secrets is None else [*known_secrets(), *secrets])
    return meta


def _carry_init_adapter(dest: Path, cfg: dict[str, Any], base: Path) -> None:
    """model.init_adapter is a directory of this machine: its weights travel, the config names them bundle-relative."""
    model = cfg.get("model") or {}
    init = model.get("init_adapter")
    if not init:
        return
    src = Path(init) if Path(init).is_absolute() else base / init
    if not (src / INIT_ADAPTER_FILES[0]).is_file():
        raise BundleError(f"model.init_adapter: no {INIT_ADAPTER_FILES[0]} in {init!r}")
    (dest / INIT_ADAPTER_DIR).mkdir(parents=True)
    for name in INIT_ADAPTER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / INIT_ADAPTER_DIR / name)
    model["init_adapter"] = INIT_ADAPTER_DIR


def scan_for_secrets(root: Path, secrets: list[str] | None = None) -> None:
    """Refuse a tree holding a credential file or any known credential value."""
    values = [s.encode("utf-8") for s in (known_secrets() if secrets is None else secrets)]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if is_secret_file(path.name):
            raise BundleError(f"refusing to upload credential file {rel}")
        if not values:
            continue
        blobs = [path.read_bytes()]
        if path.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if is_secret_file(Path(member).name):
                        raise BundleError(f"refusing to upload credential file {rel}:{member}")
                    blobs.append(zf.read(member))
        for blob in blobs:
            if any(v in blob for v in values):
                # Never name the secret, only where it was found.
                raise BundleError(f"refusing to upload {rel}: it contains a credential")
