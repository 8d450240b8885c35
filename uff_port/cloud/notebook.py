"""`uff-port notebook --platform colab CONFIG`: a Colab notebook that runs the same trainer.

Colab has no job API: nothing here submits, polls or schedules anything. The
notebook is for a person to open and run. It mounts the user's Google Drive and
keeps the run directory there, so checkpoints survive a disconnect; running it
again after a disconnect resumes from the last checkpoint (the trainer's own
resume, as `uff-port resume` does). The wheel and the corpus are copied to
Drive by the user once; the config is embedded with its data paths pointing there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import yaml

from uff_port import __version__

DRIVE_ENV: Final = "UFF_PORT_COLAB_DRIVE"
"""Overrides the Drive root (tests run the notebook's cells against a temporary directory)."""
DEFAULT_DRIVE: Final = "/content/drive/MyDrive"


def _cell(kind: str, text: str) -> dict[str, Any]:
    cell: dict[str, Any] = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def colab_config(cfg: dict[str, Any], folder: str) -> tuple[dict[str, Any], list[str]]:
    """The config as the notebook runs it (strategy local, corpus on Drive) and the corpus files to copy."""
    cfg = json.loads(json.dumps(cfg))
    cfg["strategy"] = "local"  # on Colab the trainer runs here; there is no job to route
    cfg.pop("cloud", None)
    data = cfg.setdefault("data", {})
    paths = data.get("path", "builtin:sample-corpus")
    items = [paths] if isinstance(paths, str) else list(paths)
    to_copy = [p for p in items if not p.startswith("builtin:")]
    mapped = [p if p.startswith("builtin:") else f"{{DRIVE}}/{folder}/data/{Path(p).name}" for p in items]
    data["path"] = mapped[0] if isinstance(paths, str) else mapped
    return cfg, to_copy


def write_notebook(cfg: dict[str, Any], out: Path, *, name: str, folder: str = "uff-port") -> dict[str, Any]:
    """Write the notebook; returns what the user must put on Drive."""
    run_cfg, to_copy = colab_config(cfg, folder)
    wheel = f"uff_port-{__version__}-py3-none-any.whl"
    config_yaml = yaml.safe_dump(run_cfg, sort_keys=False)
    cells = [
        _cell("markdown", (
            f"# uff-port: train `{name}` on Colab\n\n"
            "Colab has no job API: this notebook is run by hand; nothing schedules it. The run directory lives on "
            "your Google Drive, so the checkpoints survive a disconnect: after one, reconnect (GPU runtime) and run "
            "all cells again; training resumes from the last checkpoint.\n\n"
            f"Before the first run, copy to Drive `MyDrive/{folder}/`: `{wheel}` "
            "(`pip wheel --no-deps .` in the uff-port checkout)"
            + (", and into `data/`: " + ", ".join(f"`{Path(p).name}`" for p in to_copy) if to_copy else "")
            + ".\n"
        )),
        _cell("code", (
            "import os\n"
            f"DRIVE = os.environ.get({DRIVE_ENV!r}, {DEFAULT_DRIVE!r})\n"
            f"if DRIVE == {DEFAULT_DRIVE!r}:\n"
            "    from google.colab import drive\n"
            "    drive.mount('/content/drive')\n"
            f"BASE = os.path.join(DRIVE, {folder!r})\n"
            f"RUN_DIR = os.path.join(BASE, 'runs', {name!r})\n"
            "os.makedirs(RUN_DIR, exist_ok=True)\n"
        )),
        _cell("code", (
            "import importlib.util, subprocess, sys\n"
            "if importlib.util.find_spec('uff_port') is None:\n"
            f"    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', os.path.join(BASE, {wheel!r})])\n"
        )),
        _cell("code", (
            f"CONFIG = {config_yaml!r}.replace('{{DRIVE}}', DRIVE)\n"
            "config_path = os.path.join(RUN_DIR, 'colab-config.yaml')\n"
            "with open(config_path, 'w') as fh:\n"
            "    fh.write(CONFIG)\n"
        )),
        _cell("code", (
            "# The same trainer entry point as everywhere: resumes from RUN_DIR's last checkpoint by itself.\n"
            "rc = subprocess.call([sys.executable, '-m', 'uff_port.training', '--run-dir', RUN_DIR, '--config', config_path])\n"
            "print('exit', rc, '(0 finished, 75 stopped with a checkpoint: run again to continue)')\n"
        )),
    ]
    nb = {
        "nbformat": 4,
        "nbformat_minor": 4,
        "metadata": {"accelerator": "GPU", "colab": {"provenance": []},
                     "kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "cells": cells,
    }
    out.write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")
    return {"notebook": str(out), "drive_folder": f"MyDrive/{folder}", "wheel": wheel, "data": to_copy}
