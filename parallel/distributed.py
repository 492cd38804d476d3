"""Process groups of one replica: a world of TP x PP workers, one process each.

Rank layout: global rank = ``pp_rank * tp_size + tp_rank``, so a pipeline
stage is a contiguous run of ranks (the placement puts it on one node) and
the same TP rank of the next stage is ``rank + tp_size``.

Rendezvous: the rank-0 worker opens a ``TCPStore`` on port 0, i.e. the
kernel picks a free port at the moment the socket is bound, and reports its
node IP and that port; every other rank then connects to it. No port is
chosen in advance, so several replicas on one node cannot collide (nor race
between "find a free port" and "bind it").

Groups: the default (world) group carries pipeline send/recv between stages;
one subgroup per stage carries that stage's TP all-reduce / all-gather. NCCL
on CUDA, gloo on CPU (choose once, from the device); on CPU a stage's TP
collectives go through shared memory where they fit (``shm_collectives.py``). Every collective and
p2p op has ``timeout``: a peer that died or hung makes the op raise instead
of blocking forever (the engine side has its own, shorter-or-equal, bound).

Each worker is its own process (a Ray actor), so torch.distributed's
per-process default group is this worker's world and nothing else's.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from fleetlm.parallel import shm_collectives as shm
from fleetlm.parallel.context import ParallelContext


def global_rank(tp_rank: int, pp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


def split_rank(rank: int, tp_size: int) -> tuple[int, int]:
    """(tp_rank, pp_rank) of a global rank."""
    return rank % tp_size, rank // tp_size


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def create_store(timeout_s: float) -> dist.TCPStore:
    """The rank-0 side of the rendezvous: a TCP store on a port the kernel picks.

    The caller keeps the store alive (it serves the other ranks) and tells
    them ``store.port``.
    """
    return dist.TCPStore(
        "0.0.0.0",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_distributed(
    *,
    rank: int,
    tp_size: int,
    pp_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device | str,
    timeout_s: float,
    store: dist.Store | None = None,
    shm_collectives: bool = True,
) -> ParallelContext:
    """Join the replica's process group and build this worker's ``ParallelContext``.

    Called by every rank at the same time (the joins block until all arrive).
    Rank 0 passes the store it created with :func:`create_store`; the others
    connect to ``master_addr:master_port``. On CPU (gloo) a stage's TP ranks
    also share a segment for their collectives (``shm_collectives``; see
    ``parallel/shm_collectives.py``), where the host allows it.
    """
    world = tp_size * pp_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} workers")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timeout)
    backend = backend_for(device)
    kwargs = {}
    if backend == "nccl":
        # Binds the communicator to this worker's GPU eagerly (no lazy guess).
        # NCCL then runs the world group's send/recv on its one communicator,
        # serialized with that group's other ops: there are none (TP uses the
        # stage subgroups), so the warning torch prints about it is moot.
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)

    tp_rank, pp_rank = split_rank(rank, tp_size)
    tp_group = None
    # new_group is collective over the world: every rank creates every
    # stage's group, in the same order, and keeps its own.
    for stage in range(pp_size):
        ranks = [global_rank(r, stage, tp_size) for r in range(tp_size)]
        group = dist.new_group(ranks, timeout=timeout, backend=backend) if tp_size > 1 else None
        if stage == pp_rank:
            tp_group = group
    tp_shm = None
    if backend == "gloo" and tp_size > 1 and shm_collectives and shm.supported():
        tp_shm = shm.ShmCommunicator.join(store, f"fleetlm/tp-shm/stage{pp_rank}", tp_rank, tp_size, timeout_s)
    return ParallelContext(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=pp_rank,
        pp_size=pp_size,
        tp_group=tp_group,
        pp_group=dist.group.WORLD if pp_size > 1 else None,
        pp_prev_rank=global_rank(tp_rank, pp_rank - 1, tp_size) if pp_rank > 0 else None,
        pp_next_rank=global_rank(tp_rank, pp_rank + 1, tp_size) if pp_rank < pp_size - 1 else None,
        tp_shm=tp_shm,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
