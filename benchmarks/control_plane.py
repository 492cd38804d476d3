"""Per-step control overhead of a Ray worker group (CPU; issue 18's CPU measurement).

    python benchmarks/control_plane.py --out DIR [--tp 2 --pp 2] [--steps 40]

A TP x PP group of the tiny dummy model (``tiny-llama-8h4kv``, float32,
gloo) runs decode steps of 8, 64 and 256 requests whose context is 1,024
tokens (64 blocks each), over each transport:

- ``ray``: one Ray call per worker per step carrying the encoded step (the
  path of workers on other nodes);
- ``ring``: the step written once into the shared-memory ring;
- ``before``: run from a tree without the ring (``git worktree`` of an older
  commit), one Ray call per worker carrying the whole ``SchedulerOutput``.

Per step it reports the round trip (launch to result) in microseconds, its
median over ``--steps`` steps after warm-up, and the encoded step's bytes;
the same steps in the engine's own process (TP = PP = 1, no Ray) give the
compute floor. The difference between the transports is control overhead
alone (same workers, same steps). Figures from a loaded 2-core machine say
little about a GPU node; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

from fleetlm.engine.args import EngineArgs
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.step import NewRequest, ScheduledRequest, SchedulerOutput

CONTEXT, BLOCK = 1024, 16


def steps(n: int, count: int) -> list[SchedulerOutput]:
    """A prefill-free decode workload: ``n`` requests whose KV (garbage, never read for output) spans CONTEXT."""
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    blocks = CONTEXT // BLOCK + count // BLOCK + 2
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(n)]
    new = [NewRequest(f"r{i}", [5] * CONTEXT, params) for i in range(n)]
    out = []
    for k in range(count):
        pos = CONTEXT + k
        sched = [ScheduledRequest(f"r{i}", [7], pos, tables[i][: pos // BLOCK + 1], True) for i in range(n)]
        out.append(SchedulerOutput(sched, new if k == 0 else [], step_id=k))
    return out


def measure(group, n: int, count: int) -> dict:
    work = steps(n, count + 5)
    times = []
    for k, out in enumerate(work):
        t = time.perf_counter()
        group.launch(out).result()
        if k >= 5:
            times.append(time.perf_counter() - t)
    return {"requests": n, "median_us": 1e6 * statistics.median(times), "p90_us": 1e6 * sorted(times)[int(0.9 * len(times))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sizes", default="8,64,256")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = ap.parse_args()
    import ray

    import inspect

    from fleetlm.workers.ray_group import RayWorkerGroup
    from fleetlm.workers.worker_group import LocalWorkerGroup

    try:
        from fleetlm.workers.step_codec import StepEncoder
    except ImportError:  # a tree from before the ring: Ray calls with whole SchedulerOutputs
        StepEncoder = None

    sizes = [int(x) for x in ns.sizes.split(",")]
    kw = dict(model="tiny-llama-8h4kv", load_format="dummy", device="cpu", dtype="float32", max_model_len=2048,
              max_num_seqs=max(sizes), num_kv_blocks=max(sizes) * (CONTEXT // BLOCK + ns.steps // BLOCK + 4))
    result = {"what": "per-step control overhead", "tp": ns.tp, "pp": ns.pp, "context": CONTEXT,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "rows": []}
    local = LocalWorkerGroup(EngineArgs(**kw).create_engine_config())
    floor = {n: measure(local, n, ns.steps)["median_us"] for n in sizes}
    ray.init(num_cpus=max(2, ns.tp * ns.pp), include_dashboard=False, log_to_driver=False)
    try:
        config = EngineArgs(tensor_parallel_size=ns.tp, pipeline_parallel_size=ns.pp, **kw).create_engine_config()
        has_transports = "transport" in inspect.signature(RayWorkerGroup).parameters
        for transport in ("ray", "ring") if has_transports else ("before",):
            group = RayWorkerGroup(config, transport=transport) if has_transports else RayWorkerGroup(config)
            try:
                for n in sizes:
                    row = measure(group, n, ns.steps)
                    work = steps(n, 2)
                    step_bytes = len(pickle.dumps(work[1]))
                    if StepEncoder is not None:
                        enc = StepEncoder()
                        enc.encode(work[0])
                        step_bytes = len(enc.encode(work[1]))
                    row.update(transport=transport, encoded_bytes=step_bytes, in_process_us=floor[n])
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
            finally:
                group.shutdown()
    finally:
        ray.shutdown()
    path = Path(ns.out) / f"control-plane-tp{ns.tp}pp{ns.pp}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{'transport':10} {'requests':>8} {'round trip us':>14} {'in-process us':>14} {'step bytes':>11}")
    for r in result["rows"]:
        print(f"{r['transport']:10} {r['requests']:8d} {r['median_us']:14.0f} {r['in_process_us']:14.0f} "
              f"{r['encoded_bytes']:11d}")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
