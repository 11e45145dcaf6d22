"""Multi-process training under ``torchrun`` (DistributedDataParallel): gloo on CPU, NCCL on CUDA.

    torchrun --standalone --nproc_per_node 2 -m adclick_core train-click ...

Every process builds the same sample pool (same seeds), draws its own share of each batch (the
batch size stays the global one: ``ceil(batch / processes)`` per process) and DDP averages the
gradients, so N processes run the same number of iterations on the same global batch in about 1/N
of the step time. Only the first process (rank 0) writes files, shows progress and reports; work
that writes a shared file (a reference bank) runs on rank 0 first (``main_first``). Without
``torchrun`` (no ``WORLD_SIZE`` in the environment) everything is a single process, as before.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> "Distributed":
        """The process group torchrun describes in the environment (joined once), else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not torch_dist.is_initialized():
            cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
            if cuda:
                torch.cuda.set_device(local)
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, world, local)

    @classmethod
    def current(cls) -> "Distributed":
        """The group this process already joined, else a single process."""
        if torch_dist.is_available() and torch_dist.is_initialized():
            return cls(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:<local rank>``."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, batch_size: int) -> int:
        """This process's part of a global batch."""
        return max(1, math.ceil(batch_size / self.world_size))

    def wrap(self, model: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        """DDP around ``model`` (``find_unused``: some parameters may get no gradient in a step)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=find_unused)

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it writes the shared file); the others then run it (and read it)."""
        if self.active and not self.is_main:
            torch_dist.barrier()
        yield
        if self.active and self.is_main:
            torch_dist.barrier()

    def shutdown(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
