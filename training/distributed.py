"""One process or many: the same training code runs alone or under `accelerate launch`.

Under `accelerate launch` (WORLD_SIZE > 1) each process extracts features for its share of the
identities (sharded extraction), results are gathered to every process, and every process trains
on its share of each batch, gradients summed across processes (data-parallel training). Alone, the
same code runs with `LocalDist` (or `AccelerateDist` with one process, which the tests use).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch


class LocalDist:
    rank = 0
    world = 1
    is_main = True

    def __init__(self, device: torch.device | None = None):
        self.device = device

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def reduce_grads(self, params) -> None:
        return None

    def barrier(self) -> None:
        return None


class AccelerateDist:
    """Rank, device and collectives from `accelerate.Accelerator` (works with one process too)."""

    def __init__(self, device: torch.device | None = None):
        from accelerate import Accelerator

        cpu = device is not None and device.type == "cpu"
        self.accelerator = Accelerator(cpu=cpu)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device if device is None or device.type != "cpu" else device

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def reduce_grads(self, params) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_dist(device: torch.device | None = None, mode: str = "auto"):
    """`auto`: Accelerate when started by a multi-process launcher, else the plain local path."""
    if mode == "accelerate" or (mode == "auto" and launched_distributed()):
        return AccelerateDist(device)
    return LocalDist(device)


def shard_map(dist, items: Sequence[Any], fn: Callable[[int, Any], Any]) -> list[Any]:
    """fn(index, item) for this process's share (index % world == rank); results of all processes, in order."""
    mine = {i: fn(i, item) for i, item in enumerate(items) if i % dist.world == dist.rank}
    merged: dict[int, Any] = {}
    for part in dist.gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]
