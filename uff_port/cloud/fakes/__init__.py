"""Provider stand-ins: the Kaggle API (kernels run as real local processes), SageMaker and S3.

Used by tests, by `scripts/simulate_week.py` and by the worker when
`UFF_PORT_CLOUD_FAKE=<state dir>` is set, so the whole path runs for real,
offline. State lives in files under the state directory; the faults each fake
can inject are listed in its module (`kaggle.py`, `sagemaker.py`).
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
from uff_port.cloud.fakes.sagemaker import FakeLogs, FakeS3, FakeSageMakerClient

__all__ = [
    "FAKE_ENV",
    "FakeConnectionError",
    "FakeHttpError",
    "FakeKaggleApi",
    "FakeLogs",
    "FakeS3",
    "FakeSageMakerClient",
    "KernelWorkerStatus",
    "kill_tree",
]
