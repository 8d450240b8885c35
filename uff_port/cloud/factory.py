"""Backends by name: the real clients, the file-backed fakes, or a registered factory.

`REGISTRY` lets in-process tests and the simulator install their own backend
for a name; `UFF_PORT_CLOUD_FAKE=<state dir>` makes a worker (a separate
process) use the fake Kaggle API, so the real worker path runs end to end
offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from uff_port.cloud.backends.base import Backend, ProviderError
from uff_port.cloud.settings import CloudSettings

Factory = Callable[[CloudSettings, str, Path], Backend]
REGISTRY: dict[str, Factory] = {}


def make_backend(name: str, settings: CloudSettings, run_id: str, workdir: Path) -> Backend:
    if name in REGISTRY:
        return REGISTRY[name](settings, run_id, workdir)
    from uff_port.cloud.fakes import FAKE_ENV

    fake = os.environ.get(FAKE_ENV)
    if name == "kaggle":
        from uff_port.cloud.backends.kaggle import KaggleBackend, load_api

        if fake:
            from uff_port.cloud.fakes import FakeKaggleApi

            api = FakeKaggleApi(Path(fake) / "kaggle")
        else:
            api = load_api()
        return KaggleBackend(api, settings.kaggle, run_id, workdir)
    if name == "sagemaker":
        from uff_port.cloud.backends.sagemaker import SageMakerBackend, load_clients

        if fake:
            from uff_port.cloud.fakes import FakeLogs, FakeS3, FakeSageMakerClient

            s3: object = FakeS3(Path(fake) / "s3")
            sm: object = FakeSageMakerClient(Path(fake) / "sagemaker", s3)  # type: ignore[arg-type]
            logs: object = FakeLogs(Path(fake) / "sagemaker")
        else:
            sm, s3, logs = load_clients(settings.sagemaker)
        return SageMakerBackend(sm, s3, settings.sagemaker, run_id, logs=logs)
    raise ProviderError(f"strategy: unknown cloud backend {name!r}")


def local_gpu_present(settings: CloudSettings) -> bool:
    """Hybrid routing prefers a local GPU; asked through NVML, never torch."""
    if settings.local_gpu != "auto":
        return settings.local_gpu == "yes"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount()) > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False
