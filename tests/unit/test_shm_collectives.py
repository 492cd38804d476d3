"""CPU tensor-parallel collectives through shared memory: the same bits on every rank, bounded waits,
the process group where a segment cannot be shared, nothing left in /dev/shm."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading

import pytest
import torch
import torch.distributed as dist

from fleetlm.parallel import shm_collectives
from fleetlm.parallel.shm_collectives import CollectiveTimeout, ShmCommunicator

pytestmark = pytest.mark.skipif(not shm_collectives.supported(), reason="x86-64 with /dev/shm only")


def _segments() -> set[str]:
    return {n for n in os.listdir(shm_collectives.SHM_DIR) if n.startswith("fleetlm-tp-")}


def _join_all(size: int, timeout_s: float = 10.0, **kw) -> list[ShmCommunicator | None]:
    """``size`` ranks joining at once, each in a thread (the joins wait for one another)."""
    store = dist.HashStore()
    out: list = [None] * size

    def join(rank: int) -> None:
        out[rank] = ShmCommunicator.join(store, "t", rank, size, timeout_s, **kw)

    threads = [threading.Thread(target=join, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def _on_every_rank(comms, fn) -> list:
    results: list = [None] * len(comms)
    errors: list = []

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, comms[rank])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_rank_gets_the_same_bits_as_a_rank_order_sum(dtype):
    before = _segments()
    comms = _join_all(3, slot_bytes=1 << 16)
    assert all(c is not None for c in comms)
    assert _segments() == before  # the name is gone once every rank mapped it
    shapes = [(4, 576), (1, 7), (33, 100), (4, 576), (2, 3, 5)]  # both buffers, several shapes, reused

    def inputs(rank: int, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * i + rank)
        return torch.randn(shapes[i % len(shapes)], generator=g).to(dtype)

    def run(rank: int, comm: ShmCommunicator) -> list:
        out = []
        for i in range(40):
            x = inputs(rank, i)
            kind = i % 3
            if kind == 0:
                out.append(comm.all_reduce(x.clone()))
            elif kind == 1:
                out.append(comm.broadcast(x.clone(), src=0))
            else:
                out.append(comm.all_gather_last_dim(x))
        return out

    results = _on_every_rank(comms, run)
    for i in range(40):
        xs = [inputs(r, i) for r in range(3)]
        expected = [xs[0] + xs[1] + xs[2], xs[0], torch.cat(xs, dim=-1)][i % 3]
        for rank in range(3):
            assert results[rank][i].dtype == dtype
            assert torch.equal(results[rank][i], expected), (i, rank)
    for c in comms:
        c.close()


def test_only_what_fits_goes_through_shared_memory():
    (comm,) = _join_all(1, slot_bytes=1024)
    assert comm.fits(torch.zeros(256))  # 1024 bytes
    assert not comm.fits(torch.zeros(257))
    assert not comm.fits(torch.zeros(16, 16).t())  # not contiguous
    comm.close()


def test_a_rank_that_never_arrives_times_out_naming_it():
    comms = _join_all(2, timeout_s=0.3)
    with pytest.raises(CollectiveTimeout, match=r"rank\(s\) \[1\] did not arrive within 0.3 s"):
        comms[0].all_reduce(torch.ones(8))
    for c in comms:
        c.close()


def test_a_rank_that_cannot_map_the_segment_sends_every_rank_to_the_process_group(monkeypatch):
    real = shm_collectives._map

    def fail_on_rank_2(path, nbytes, create):
        if threading.current_thread().name == "rank2":
            raise FileNotFoundError(path)  # as on another host
        return real(path, nbytes, create)

    monkeypatch.setattr(shm_collectives, "_map", fail_on_rank_2)
    before = _segments()
    assert _join_all(3) == [None, None, None]
    assert _segments() == before


def _rank_main(rank: int, world: int, port: int, q) -> None:
    torch.set_num_threads(1)
    from fleetlm.parallel.distributed import init_distributed

    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False) if rank == 0 else None
    ctx = init_distributed(rank=rank, tp_size=world, pp_size=1, master_addr="127.0.0.1", master_port=port,
                           device="cpu", timeout_s=60, store=store)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(rank))
    gloo = x.clone()
    dist.all_reduce(gloo, group=ctx.tp_group)
    shm = ctx.all_reduce(x.clone())
    big = torch.full((600, 576), float(rank + 1))  # over a slot: through gloo
    ctx.all_reduce(big)
    q.put((rank, ctx.tp_shm is not None, torch.allclose(shm, gloo, atol=1e-5), shm.tolist(), big.unique().tolist()))
    dist.destroy_process_group()


def test_workers_of_one_host_use_it_through_init_distributed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 3, port, q)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        results = sorted(q.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert all(on and close for _, on, close, _, _ in results)  # shared memory, the sum gloo gets
    assert results[0][3] == results[1][3] == results[2][3]  # the same bits on every rank
    assert all(big == [6.0] for *_, big in results)  # the one too large for a slot went through gloo
