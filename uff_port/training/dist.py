"""The few torch.distributed operations the loop needs, no-ops in one process.

Set up by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA,
gloo on CPU. Nothing here decides anything; it only makes ranks agree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> None:
    """Join the process group torchrun described; nothing to do in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend, timeout=timedelta(minutes=10))


def init_single() -> None:
    """A process group of one (DeepSpeed needs a group even on a single device)."""
    if is_distributed():
        return
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend=backend, timeout=timedelta(minutes=10), rank=0, world_size=1)


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def shutdown() -> None:
    if is_distributed():
        tdist.destroy_process_group()


def wrap(model: Any, device: torch.device) -> Any:
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def no_sync_unless(model: Any, last: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on every micro-batch but the step's last."""
    if last or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def agree_max(value: int, device: torch.device) -> int:
    """Every rank gets the largest value any rank proposed (a stop on one is a stop on all)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj: Any) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
