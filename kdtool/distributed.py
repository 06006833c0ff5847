"""Joining a torchrun process group (shared by `distill` and `train-sae`).

Under `torchrun --nproc_per_node N` (or `python -m torch.distributed.run`) the environment holds
WORLD_SIZE, RANK and LOCAL_RANK; without it everything here is a no-op (one process, rank 0).
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dist_init(device: str) -> Dist:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    world = world_size()
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as td

    local = int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not td.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        td.init_process_group(backend=backend)
        started = True
    return Dist(rank=td.get_rank(), world=td.get_world_size(), local_rank=local, started_here=started)


def dist_close(d: Dist, *, finished: bool = True) -> None:
    """Leave the process group. After a finished run every rank first waits for the others: a rank that
    tears its gloo connections down while a peer is still at work can abort that peer ("terminate called
    without an active exception", seen on a resumed train-sae). After an error there is no waiting (the
    other ranks may be in another collective; torchrun stops them)."""
    if d.started_here:
        import torch.distributed as td

        if finished:
            barrier(d)
        td.destroy_process_group()


def all_reduce(t, d: Dist):
    """Sum `t` in place over the ranks (no-op for one process); returns t."""
    if d.world > 1:
        import torch.distributed as td

        td.all_reduce(t)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as td

        td.barrier()
