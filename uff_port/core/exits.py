"""The one table of process exit codes (docs/protocol.md, "Exit codes").

The trainer (`python -m uff_port.training`), the worker (`uff-port serve`) and
the cloud runners (`python -m uff_port.cloud`, the in-session entry) all exit
with these; the worker and the cloud runner read a child's status against them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """Finished (trainer: `training.max_steps` reached, final adapter saved), or
    the worker after `shutdown`/EOF with nothing lost."""
    CRASH = 1
    """Crashed, or the worker lost a job without a durable checkpoint. A trainer
    sends a `failed` event first when it can."""
    REFUSED = 3
    """Refused before training: bad config, missing model, won't fit."""
    RESUMABLE = 75
    """Stopped early with a durable checkpoint (EX_TEMPFAIL): run it again to resume."""
