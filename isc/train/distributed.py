"""torchrun-aware process-group helpers (gloo on CPU, NCCL on GPU). All are no-ops without torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from isc.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Pick the device and, under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group.

    ``timeout_s``: how long a collective may wait (torch's default otherwise: 10 min for NCCL); ranks
    that wait on rank 0's work -- e.g. the merge of a sharded extraction -- need more."""
    world = world_size_from_env()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device == "cuda":
        dev = torch.device(f"cuda:{local_rank}")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():  # else set_device dies with a driver traceback

            raise ConfigError("device", f"{device} requested but no GPU is visible")
        torch.cuda.set_device(dev)
    initialised = False
    if world > 1 and not dist.is_initialized():
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", **kwargs)
        initialised = True
    return DistInfo(rank, local_rank, world, dev, initialised)


def teardown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Sum scalar metrics over ranks (same keys on every rank)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the output folder named after the MLflow run)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_tensor(info: DistInfo, t: torch.Tensor) -> list[torch.Tensor]:
    if not info.distributed:
        return [t]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t.contiguous())
    return out


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The training loop's DDP wrapping (also what ``bench/gpu_check.py`` checks): on CUDA every BatchNorm
    becomes a SyncBatchNorm first -- timm's converter, which also handles timm's fused ``BatchNormAct2d``
    -- so per-rank batches of 32 normalise over the global batch; then DistributedDataParallel, one device
    per process. Needs an initialised process group. The bare network is ``result.module``."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
