"""Provider stand-ins: the Kaggle API (kernels run as real local processes), SageMaker and S3.

Used by tests, by `scripts/simulate_week.py` and by the worker when
`UFF_PORT_CLOUD_FAKE=<state dir>` is set, so the whole path (bundle, dataset
version, generated kernel script, entry point, trainer, paged download,
verification) runs for real, offline. Method names and signatures follow
`kaggle.api.kaggle_api_extended.KaggleApi`.

All state lives in files under the state directory, so a worker that is
killed and restarted sees the same "remote" kernels. Faults are read from
`faults.json` there on every call:

- `outage`: [start, end] unix seconds during which every call raises a
  connection error (the clock is injectable for fake-time tests);
- `status_errors`: the next N calls of `kernels_status` fail transiently;
- `tamper`: `alter` | `truncate` | `extra` | `missing`, applied to the next download;
- `old_status_format`: answer `kernels_status` with the old `{"status": "running"}` dict;
- `page_size`: files per `kernels_output` page (default 3);
- `kill_after`: hard session limit in seconds (SIGKILL), like Kaggle's 12 h.
"""

from __future__ import annotations

from uff_port.cloud.fakes.kaggle import (
    FAKE_ENV,
    FakeConnectionError,
    FakeHttpError,
    FakeKaggleApi,
    KernelWorkerStatus,
    kill_tree,
)
from uff_port.cloud.fakes.sagemaker import FakeS3, FakeSageMakerClient

__all__ = [
    "FAKE_ENV",
    "FakeConnectionError",
    "FakeHttpError",
    "FakeKaggleApi",
    "FakeS3",
    "FakeSageMakerClient",
    "KernelWorkerStatus",
    "kill_tree",
]
