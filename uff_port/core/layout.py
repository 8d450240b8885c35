"""The run directory: the one place its file and directory names are spelled.

```
RUN_DIR/config.yaml            resolved config
RUN_DIR/events.jsonl           every event of the job, appended
RUN_DIR/trainer.log            the trainer's stdout and stderr
RUN_DIR/checkpoints/           step-NNNNNNNN/ + LATEST (owned by core.checkpoint_store)
RUN_DIR/checkpoints.lock       the single-writer lock of checkpoints/
RUN_DIR/final/                 the final adapter + manifest.json
RUN_DIR/eval/                  evaluation results
RUN_DIR/cloud/                 a cloud run's journal, bundle, resume tree, pulls, work dirs
RUN_DIR/session.json           what a cloud session left behind (in the session's run dir)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

CONFIG: Final = "config.yaml"
EVENTS: Final = "events.jsonl"
TRAINER_LOG: Final = "trainer.log"
CHECKPOINTS: Final = "checkpoints"
CHECKPOINTS_LOCK: Final = "checkpoints.lock"
FINAL: Final = "final"
EVAL: Final = "eval"
CLOUD: Final = "cloud"
SESSION: Final = "session.json"
MANIFEST: Final = "manifest.json"
"""The sha256 manifest inside a checkpoint directory and inside `final/`."""


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; builds paths only, never touches the disk."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def trainer_log(self) -> Path:
        return self.root / TRAINER_LOG

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def checkpoints_lock(self) -> Path:
        return self.root / CHECKPOINTS_LOCK

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def cloud(self) -> Path:
        return self.root / CLOUD

    @property
    def session(self) -> Path:
        return self.root / SESSION
