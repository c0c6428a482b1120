"""One process or many: DistributedDataParallel under ``torchrun`` (NCCL on GPUs, gloo on CPUs).

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; without them this is a plain single
process. Only rank 0 writes files; every rank reads the same data and checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from napari_segthenseg.engine import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    joined: bool = False  # in a process group (under torchrun), even a world of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Resolve the device and, under ``torchrun``, join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if "RANK" not in os.environ:  # not under torchrun; `torchrun --nproc_per_node=1` still joins
        return DistInfo(0, 1, 0, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        raise ValueError(f"distributed training supports cuda (NCCL) and cpu (gloo), not {dev.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(rank, world, local, dev, joined=True)


def cleanup(info: DistInfo) -> None:
    if info.joined and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.joined:
        dist.barrier()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum numbers over all ranks (e.g. Dice sums and counts of each rank's validation shard)."""
    if not info.joined:
        return list(values)
    backend_dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=backend_dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()
