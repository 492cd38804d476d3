"""``fleetlm.benchmarks``: the benchmark and drill tooling, apart from the Serve application.

- ``cli``: ``fleetlm bench throughput|latency|prefix|serve`` (each run writes a
  JSON record: ``records``);
- ``offline``: the engine-side workloads (``run_throughput``, ``run_latency``,
  ``run_prefix``, ``run_batch``); ``ceilings``: the device's measured matmul
  and copy ceilings; ``model_shape``: parameter, FLOP and byte arithmetic;
- ``serve_load``: load against a running OpenAI endpoint;
- ``sse_client``: the one streaming client every tool here uses;
- ``drill``: a local app to break (kill a replica or a worker) and its own
  account of itself afterwards.

The scripts beside these modules (``gpu_suite.py``, ``gpu_startup.py``, ...)
run on the GPU machine and write ``results/*.json``; ``RESULTS.md`` sums them up.
Nothing in the server imports this package.
"""
