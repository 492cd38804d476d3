"""Multi-LoRA on one GPU, Llama-3.1-8B shape, dummy bf16 weights, rank 16 on all seven projections.

- The Triton shrink/expand at the model's projection shapes against their torch
  references, for decode- and prefill-sized steps, 8 slots, base tokens mixed in.
- The engine's greedy tokens per adapter (base + 3 adapters mixed in one batch,
  CUDA graphs on, prefix caching on) against transformers on the same weights
  with PEFT's LoRA math hooked onto its projections; in bf16 a divergence is
  accepted only where the reference's top two logits are within
  ``hf_baseline.PARITY_GAP_TOL`` (as tests/gpu/test_engine_gpu.py).

The reference runs first and is freed before the engine loads.
Run on the device machine: ``pytest -m gpu tests/gpu/test_lora_gpu.py -s``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
MODEL = "llama-3.1-8b"


def _module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gl():
    return _module("gpu_lora")


@pytest.mark.parametrize("rows", [1, 7, 64, 256, 300, 4096])
def test_kernels_match_torch_at_8b_shapes(gl, rows):
    from fleetlm.kernels.lora import (LoRABatch, build_tile_table, lora_expand, lora_expand_ref, lora_shrink,
                                      lora_shrink_ref)
    from fleetlm.workers.loader import resolve_model

    shapes = gl.module_shapes(resolve_model(MODEL, "dummy").hf_config)
    layers = [(shapes["q_proj"][0], (shapes["q_proj"][1], shapes["k_proj"][1], shapes["v_proj"][1])),
              (shapes["o_proj"][0], (shapes["o_proj"][1],)),
              (shapes["gate_proj"][0], (shapes["gate_proj"][1], shapes["up_proj"][1])),
              (shapes["down_proj"][0], (shapes["down_proj"][1],))]
    gen = torch.Generator().manual_seed(rows)
    slots, rank = 8, 16
    token_slot = torch.randint(-1, slots, (rows,), generator=gen).numpy().astype("int32")
    order, ts, tst, te = build_tile_table(token_slot, rows, slots)
    dev = lambda v: torch.from_numpy(v).cuda()  # noqa: E731
    batch = LoRABatch(dev(order), dev(ts), dev(tst), dev(te), torch.linspace(0.5, 2.0, slots, device="cuda"))
    for k, slices in layers:
        n = sum(slices)
        a = (torch.randn(slots, len(slices) * rank, k, generator=gen) / k ** 0.5).bfloat16().cuda()
        b = (torch.randn(slots, n, rank, generator=gen) * 0.05).bfloat16().cuda()
        x = torch.randn(rows, k, generator=gen).bfloat16().cuda()
        y = torch.randn(rows, n, generator=gen).bfloat16().cuda()
        got = lora_expand(y.clone(), lora_shrink(x, a, batch), b, batch, slices)
        want = lora_expand_ref(y.clone(), lora_shrink_ref(x, a, batch), b, batch, slices)
        torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=3e-2)
        base = torch.from_numpy(token_slot < 0).cuda()
        assert torch.equal(got[base], y[base])


def test_no_recompile_per_length():
    """Lengths are no kernel argument: after one call per tile class, every other length runs at once
    (vLLM's first LoRA TTFT was 10x base for recompiles per length)."""
    import time

    import numpy as np

    from fleetlm.kernels.lora import LoRABatch, build_tile_table, lora_expand, lora_shrink

    slots, rank, k, slices = 8, 16, 4096, (4096, 1024, 1024)
    a = torch.randn(slots, 3 * rank, k, device="cuda").bfloat16()
    b = torch.randn(slots, sum(slices), rank, device="cuda").bfloat16()

    def call(rows):
        token_slot = (np.arange(rows) % slots).astype("int32")
        order, ts, tst, te = build_tile_table(token_slot, rows, slots)
        dev = lambda v: torch.from_numpy(v).cuda()  # noqa: E731
        batch = LoRABatch(dev(order), dev(ts), dev(tst), dev(te), torch.ones(slots, device="cuda"))
        x = torch.randn(rows, k, device="cuda").bfloat16()
        y = torch.zeros(rows, sum(slices), device="cuda").bfloat16()
        torch.cuda.synchronize()
        t = time.perf_counter()
        lora_expand(y, lora_shrink(x, a, batch), b, batch, slices)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for rows in (1, 8, 16, 64, 256, 300, 1000, 4096):  # every tile size and split class once
        call(rows)
    slowest = max((call(rows), rows) for rows in [2, 3, 5, 7, 9, 13, 17, 33, 65, 127, 129, 255, 257, 301, 333, 517,
                                                  999, 1001, 2047, 3001])
    assert slowest[0] < 0.05, f"{slowest[1]} rows took {slowest[0]:.3f} s: a compile"


@pytest.fixture(scope="module")
def adapters(gl, tmp_path_factory):
    from fleetlm.workers.loader import resolve_model

    hf = resolve_model(MODEL, "dummy").hf_config
    work = tmp_path_factory.mktemp("adapters")
    return [gl.write_peft_adapter(work / f"a{j}", hf, seed=j) for j in range(3)]


def test_engine_matches_transformers_with_peft_math(gl, adapters):
    import hf_baseline

    from fleetlm import LLM, LoRARequest

    ns = SimpleNamespace(model=MODEL, device="cuda", torch_dtype=torch.bfloat16, parity_tokens=32)
    prompts = hf_baseline.parity_prompts(128256, 4, seed=0)
    refs = gl.part_parity_ref(ns, None, adapters, prompts, deadline=float("inf"))
    assert set(refs) == {"base", "parity-0", "parity-1", "parity-2"}
    llm = LLM(model=MODEL, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=64,
              enable_lora=True, max_loras=4, max_lora_rank=16)
    try:
        loras = {f"parity-{j}": LoRARequest(f"a{j}", j + 1, adapters[j]) for j in range(3)}
        result = gl.compare_parity(llm.engine, refs, loras, prompts, 32, deadline=float("inf"))
        print(json.dumps(result, indent=1))
        assert result["adapters_change_tokens"]
        assert result["within_tolerance"], result
        # Again: every prompt's blocks are cached under its adapter now, and the tokens hold.
        again = gl.compare_parity(llm.engine, refs, loras, prompts, 32, deadline=float("inf"))
        assert again["within_tolerance"] and llm.engine.stats().prefix_cache_hit_tokens > 0
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
