"""NCCL collectives captured inside CUDA graphs, proven on one GPU.

A TP group's decode graph holds its all-reduces (``workers/worker_actor.py``
captures graphs in Ray workers with the collectives inside). With one GPU the
capture path is proven with a world of one: an NCCL all-reduce captured in a
graph between two kernels, replayed with new inputs, must give what eager
execution gives; and a Ray worker (``distributed_executor_backend="ray"``,
TP = 1) must capture its decode graphs and decode the same greedy tokens as
the engine's own process.

Run on the device machine: ``pytest -m gpu tests/gpu/test_nccl_graph_gpu.py``.
"""

from __future__ import annotations

import datetime
import importlib.util
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def nccl_world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda:0"))
    group = dist.new_group([0], backend="nccl")
    yield group
    dist.destroy_process_group()


def test_all_reduce_captured_in_a_graph_replays(nccl_world_of_one):
    group = nccl_world_of_one
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64

    def step():
        y = x @ w
        dist.all_reduce(y, group=group)
        return torch.relu(y)

    step()  # NCCL's lazy setup outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())


def test_ray_worker_captures_graphs_and_matches_in_process():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not on this GPU machine (carry the kit)")
    import ray

    from fleetlm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [[(37 * i + 11 * j) % 30000 + 100 for j in range(16 + 8 * i)] for i in range(8)]
    kw = dict(model="llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=1024,
              gpu_memory_utilization=0.45)
    local = LLM(**kw)
    want = [o.outputs[0].token_ids for o in local.generate(prompts, params)]
    local.engine.shutdown()
    del local
    torch.cuda.empty_cache()
    ray.init(num_gpus=1, include_dashboard=False)
    try:
        remote = LLM(distributed_executor_backend="ray", **kw)
        group = remote.engine.workers
        assert group.steps is not None and group.startup_seconds.get("cuda_graphs", 0) > 0
        got = [o.outputs[0].token_ids for o in remote.generate(prompts, params)]
        assert remote.engine.num_steps_ahead > 0
        remote.engine.shutdown()
    finally:
        ray.shutdown()
    assert got == want
