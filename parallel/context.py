"""Where one worker sits in its replica: tensor- and pipeline-parallel ranks and groups.

Built once per worker and passed down to the layers explicitly (no global
process-group state), so several replicas can live in one process in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed ProcessGroup of this stage's TP ranks
    pp_group: Any = None  # ProcessGroup over everything, for stage-to-stage send/recv
    pp_prev_rank: int | None = None  # global rank of the previous stage's same TP rank
    pp_next_rank: int | None = None
    # CPU ranks of one host: TP collectives through shared memory (parallel/shm_collectives.py),
    # the process group for what does not fit. None: the process group for everything.
    tp_shm: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            if self.tp_shm is not None and self.tp_shm.fits(x):
                return self.tp_shm.all_reduce(x)
            dist.all_reduce(x, group=self.tp_group)
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of this stage's TP rank 0, on every TP rank of the stage (in place)."""
        if self.tp_size > 1:
            if self.tp_shm is not None and self.tp_shm.fits(x):
                return self.tp_shm.broadcast(x, src=0)
            dist.broadcast(x, src=self.pp_rank * self.tp_size, group=self.tp_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        if self.tp_shm is not None and self.tp_shm.fits(x):
            return self.tp_shm.all_gather_last_dim(x)
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()
