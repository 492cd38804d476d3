"""CPU tensor parallelism: TP collectives through gloo vs shared memory, per collective and end to end.

    python benchmarks/cpu_collectives.py --out DIR [--iters 600] [--tokens 32]

1. One all-reduce, world 2 and 3 (spawned processes, one torch thread each),
   of a decode step's activations of the embedded model ([4, 576] and
   [64, 576] float32): gloo (``init_distributed(shm_collectives=False)``)
   against shared memory (``parallel/shm_collectives.py``), median of
   ``--iters`` after a warm-up.
2. The embedded model at TP=3 over Ray workers, 4 prompts x ``--tokens``
   greedy tokens, with and without ``disable_custom_all_reduce``, and on one
   device: generation seconds (the engine already built), tokens/s.

A 2-core machine runs three ranks on two cores: what it shows is the cost of
each collective's wake-ups, not a server's TP speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

SHAPES = ((4, 576), (64, 576))


def _rank(rank: int, world: int, port: int, shm: bool, iters: int, q) -> None:
    import torch
    import torch.distributed as dist

    from fleetlm.parallel.distributed import init_distributed

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False) if rank == 0 else None
    ctx = init_distributed(rank=rank, tp_size=world, pp_size=1, master_addr="127.0.0.1", master_port=port,
                           device="cpu", timeout_s=60, store=store, shm_collectives=shm)
    assert (ctx.tp_shm is not None) == shm
    out = {}
    for shape in SHAPES:
        x = torch.randn(shape)
        for _ in range(50):
            ctx.all_reduce(x.clone())
        times = []
        for _ in range(iters):
            y = x.clone()
            t = time.perf_counter()
            ctx.all_reduce(y)
            times.append(time.perf_counter() - t)
        out[str(list(shape))] = statistics.median(times) * 1e6
    q.put((rank, out))
    dist.destroy_process_group()


def collective_latency(world: int, shm: bool, iters: int) -> dict[str, float]:
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, shm, iters, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    return dict(sorted(results)[0][1])  # rank 0's medians


def generation(tokens: int, **kw) -> dict[str, float]:
    from fleetlm import LLM, SamplingParams

    prompts = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm = LLM(model="smollm2-135m-instruct", device="cpu", dtype="float32", max_model_len=256,
              cpu_kv_cache_bytes=32 << 20, **kw)
    try:
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))  # first-step costs out of the way
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - t
        collectives = getattr(llm.engine.workers, "tp_collectives", ["none"])
    finally:
        llm.engine.shutdown()
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds, "tp_collectives": " and ".join(collectives)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=32)
    ns = ap.parse_args()
    import ray

    from fleetlm.benchmarks.records import make_record, write_record

    latency = []
    for world in (2, 3):
        for shm in (False, True):
            us = collective_latency(world, shm, ns.iters)
            latency.append({"world": world, "via": "shared memory" if shm else "gloo", "median_us": us})
            print(f"all-reduce, world {world}, {'shared memory' if shm else 'gloo':13}: "
                  + ", ".join(f"{k} {v:.0f} us" for k, v in us.items()), flush=True)
    runs = {"one device": generation(ns.tokens)}
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        for name, off in (("tp3 gloo", True), ("tp3 shared memory", False), ("tp3 gloo again", True)):
            runs[name] = generation(ns.tokens, tensor_parallel_size=3, disable_custom_all_reduce=off)
    finally:
        ray.shutdown()
    for name, r in runs.items():
        print(f"{name:18} {r['seconds']:6.2f} s, {r['tokens_per_s']:6.1f} tok/s ({r['tp_collectives']})")
    config = {"iters": ns.iters, "tokens": ns.tokens, "shapes": [list(s) for s in SHAPES], "prompts": 4,
              "model": "smollm2-135m-instruct", "dtype": "float32"}
    path = write_record(make_record("cpu-collectives", config, {"all_reduce": latency, "generation": runs},
                                    device="cpu"), results_dir=ns.out)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
