"""kv_cache_dtype="fp8" on one GPU: the E4M3 kernels at full size, and the engine with CUDA graphs.

Kernels at Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128) against their torch
references on the same E4M3 cache: the store bit for bit; attention (decode, split-K, prefill,
cached prefix, chunked mixed batches) within bf16 rounding. The engine: the KV pool holds 2x the
tokens of a bf16 cache at the 8B shape; asynchronous scheduling and CUDA graphs run over the FP8
cache and agree with synchronous and eager runs.

Run on the device machine: ``pytest -m gpu tests/gpu/test_kv_fp8_gpu.py -s``.
"""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest
import torch

from fleetlm.kernels import HAS_TRITON, attention, kv_cache
from fleetlm.kernels.bench import make_paged_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable"),
]

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
FP8 = torch.float8_e4m3fn
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.float32: dict(atol=1e-4, rtol=1e-4)}
CASES = {
    "decode_64x4096": ([1] * 64, [4096] * 64),
    "decode_ragged": ([1] * 7, [1, 17, 4096, 8191, 300, 16, 2049]),
    "decode_1x32768": ([1], [32768]),
    "decode_1x8192": ([1], [8192]),  # FP8's default tile (128 keys) split 32 ways on 132 SMs
    "prefill_ragged": ([2048, 1000, 513, 1], [2048, 1000, 513, 1]),
    "prefill_cached_prefix": ([1024, 777], [4096, 2377]),
    "chunked_mixed": ([1, 512, 1, 1, 300], [4096, 1536, 77, 2049, 300]),
}


def _fp8_batch(q_lens, seq_lens, dtype, seed=0):
    """A paged batch whose cache holds E4M3 with per-head power-of-two scales (heads of different ranges)."""
    batch = make_paged_batch(q_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, dtype, "cuda", seed=seed)
    gain = torch.exp2(torch.arange(KV_HEADS, device="cuda", dtype=torch.float32) - 3)  # 1/8 .. 16
    k_scale = torch.exp2(torch.ceil(torch.log2(gain * 6 / 448)))
    v_scale = torch.exp2(torch.ceil(torch.log2(gain * 3 / 448)))
    k = kv_cache.quantize_fp8(batch.k_cache.float() * gain.view(-1, 1), k_scale)
    v = kv_cache.quantize_fp8(batch.v_cache.float() * gain.view(-1, 1) / 2, v_scale)
    return dataclasses.replace(batch, k_cache=k, v_cache=v), {"k_scale": k_scale, "v_scale": v_scale}


def test_fp8_gpu_is_supported_here():
    kv_cache.check_fp8_kv_supported(torch.device("cuda"))  # H100/H200: compute capability 9.0


def test_store_kv_cache_fp8_bit_for_bit():
    tokens, num_blocks = 3001, 400
    gen = torch.Generator(device="cuda").manual_seed(0)
    spread = torch.exp2(torch.randint(-14, 10, (tokens, KV_HEADS, HEAD_DIM), generator=gen, device="cuda").float())
    k = (torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * spread).to(torch.bfloat16)
    v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * spread.flip(0)).to(torch.bfloat16)
    scales = {"k_scale": torch.exp2(torch.arange(-4, 4, device="cuda").float()),
              "v_scale": torch.exp2(torch.arange(3, -5, -1, device="cuda").float())}
    slots = torch.randperm(num_blocks * 16, generator=gen, device="cuda")[:tokens]
    slots[::7] = -1
    k_cache = torch.zeros(num_blocks, 16, KV_HEADS, HEAD_DIM, device="cuda").to(FP8)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache.store_kv_cache_ref(k, v, k_ref, v_ref, slots, **scales)
    kv_cache.store_kv_cache(k, v, k_cache, v_cache, slots, **scales)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    assert k_ref.float().abs().max() == 448.0  # saturation exercised


def test_store_kernel_and_reference_encode_every_bf16_value_as_torchs_cast():
    # The store computes E4M3 bytes with integer steps (no float->fp8 instruction): on this GPU it and the
    # reference must give torch's own cast (nearest even, saturating) for every bfloat16 value.
    x = torch.arange(-32768, 32768, dtype=torch.int32, device="cuda").to(torch.int16).view(torch.bfloat16)
    x = x.view(-1, KV_HEADS, HEAD_DIM)  # 64 tokens
    want = x.float().clamp(-448.0, 448.0).to(FP8).view(torch.uint8)
    assert torch.equal(kv_cache.encode_e4m3(x.float()), want)
    k_cache = torch.zeros(8, 16, KV_HEADS, HEAD_DIM, dtype=torch.uint8, device="cuda").view(FP8)
    v_cache = k_cache.clone()
    one = torch.ones(KV_HEADS, device="cuda")
    slots = torch.arange(x.shape[0], device="cuda").flip(0)
    kv_cache.store_kv_cache(x, -x, k_cache, v_cache, slots, one, one)
    got = k_cache.view(torch.uint8).view(-1, KV_HEADS, HEAD_DIM)[: x.shape[0]].flip(0)
    assert torch.equal(got, want)
    got_v = v_cache.view(torch.uint8).view(-1, KV_HEADS, HEAD_DIM)[: x.shape[0]].flip(0)
    assert torch.equal(got_v, (-x).float().clamp(-448.0, 448.0).to(FP8).view(torch.uint8))


@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_fp8_bf16(case):
    batch, scales = _fp8_batch(*CASES[case], torch.bfloat16)
    out = attention.paged_attention(*batch.args(), **scales)
    ref = attention.paged_attention_ref(*batch.args(), **scales)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    assert (out.float() - ref.float()).abs().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["decode_ragged", "chunked_mixed"])
def test_paged_attention_fp8_other_dtypes(case, dtype):
    batch, scales = _fp8_batch(*CASES[case], dtype, seed=1)
    out = attention.paged_attention(*batch.args(), **scales)
    torch.testing.assert_close(out, attention.paged_attention_ref(*batch.args(), **scales), **TOL[dtype])


@pytest.mark.parametrize("block_n,num_splits,num_stages", [(64, 1, 3), (64, 5, 3), (128, 16, 2), (32, 3, 3)])
def test_decode_tiles_and_splits_fp8(block_n, num_splits, num_stages):
    batch, scales = _fp8_batch([1] * 3, [3000, 20, 9000], torch.bfloat16, seed=2)
    config = attention.DecodeConfig(block_n=block_n, num_splits=num_splits, num_warps=4, num_stages=num_stages)
    out = attention.paged_attention_decode(*batch.args()[:7], batch.max_seqlen_k, config, **scales)
    torch.testing.assert_close(out, attention.paged_attention_ref(*batch.args(), **scales), **TOL[torch.bfloat16])


def _compiled_variants(fn) -> int:
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        pytest.skip("this triton keeps its compiled kernels elsewhere")
    return sum(len(entry[0]) for entry in caches.values())


def test_step_to_step_shapes_compile_no_new_variant():
    # Block tables as wide as the longest request (1, 16, 32, 33 blocks) and 1, 16 or 17 requests: one
    # compiled variant per kernel, not one per divisibility class met mid-serving.
    config = attention.DecodeConfig(block_n=128, num_splits=3, num_warps=4, num_stages=2)
    counts = []
    for reqs, ctx in ((1, 16), (16, 16 * 16), (17, 32 * 16), (16, 33 * 16 - 5), (3, 40 * 16)):
        batch, scales = _fp8_batch([1] * reqs, [ctx] * reqs, torch.bfloat16, seed=reqs)
        attention.paged_attention_decode(*batch.args()[:7], batch.max_seqlen_k, config, **scales)
        batch, scales = _fp8_batch([ctx] * reqs, [ctx] * reqs, torch.bfloat16, seed=reqs)
        attention.paged_attention_prefill(*batch.args()[:7], **scales)
        counts.append((_compiled_variants(attention._decode_kernel), _compiled_variants(attention._prefill_kernel)))
    assert counts[1:] == counts[:1] * (len(counts) - 1), counts


def test_fp8_error_against_the_bf16_cache():
    # The same values in a bf16 cache: E4M3 (3 mantissa bits) stays within a few percent.
    q_lens, seq_lens = CASES["chunked_mixed"]
    exact = make_paged_batch(q_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda", seed=3)
    fp8, scales = _fp8_batch(q_lens, seq_lens, torch.bfloat16, seed=3)
    gain = torch.exp2(torch.arange(KV_HEADS, device="cuda", dtype=torch.float32) - 3).view(-1, 1)
    exact = dataclasses.replace(exact, k_cache=(exact.k_cache.float() * gain).to(torch.bfloat16),
                                v_cache=(exact.v_cache.float() * gain / 2).to(torch.bfloat16))
    ref = attention.paged_attention(*exact.args()).float()
    out = attention.paged_attention(*fp8.args(), **scales).float()
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"\nrelative error of the FP8 cache's attention output vs bf16's: {err:.4f}")
    assert 1e-3 < err < 0.04


# --- the engine -------------------------------------------------------------------------------------


def _free(llm) -> None:
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def test_pool_holds_twice_the_tokens_at_the_8b_shape():
    from fleetlm import LLM, SamplingParams

    blocks = {}
    for dtype in ("auto", "fp8"):
        # Defaults otherwise: the pool is sized from memory, not capped by max_num_seqs x max_model_len.
        llm = LLM(model="llama-3.1-8b", load_format="dummy", device="cuda", kv_cache_dtype=dtype, warmup=False)
        blocks[dtype] = llm.engine.workers.num_blocks
        out = llm.generate([[7] * 300, [9] * 20], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        assert [len(o.outputs[0].token_ids) for o in out] == [16, 16]
        assert llm.engine.workers.worker.runner.graphs is not None
        _free(llm)
    print(f"\nKV blocks: auto {blocks['auto']}, fp8 {blocks['fp8']} ({blocks['fp8'] / blocks['auto']:.4f}x)")
    # The same budget (up to what the allocator kept between the two engines), half the bytes per block.
    assert 1.99 <= blocks["fp8"] / blocks["auto"] <= 2.01


@pytest.fixture(scope="module")
def tiny_fp8():
    from fleetlm import LLM

    llm = LLM(model="tiny-llama-8h4kv", load_format="dummy", device="cuda", dtype="bfloat16", max_model_len=512,
              max_num_seqs=8, num_kv_blocks=256, kv_cache_dtype="fp8")
    assert llm.engine.async_scheduling and llm.engine.workers.worker.runner.graphs is not None
    yield llm
    _free(llm)


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 17, 33, 64, 3, 48)]


def test_async_and_sync_give_identical_tokens_over_fp8(tiny_fp8):
    from fleetlm import SamplingParams

    eng = tiny_fp8.engine
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    runs = {}
    for async_on in (False, True):
        eng.async_scheduling = async_on
        eng.scheduler.blocks.reset_prefix_cache()
        runs[async_on] = [o.outputs[0].token_ids for o in tiny_fp8.generate(_prompts(0), params)]
        assert eng.idle_invariants()["ok"]
    assert runs[True] == runs[False]


def test_cuda_graphs_match_eager_over_fp8(tiny_fp8):
    # A graph replays the same kernels on a padded batch; eager runs the exact batch. They agree up
    # to the drift E4M3 turns last-bit differences into (tests/integration/test_kv_cache_fp8.py):
    # a shared token's logprob within 0.3 nats, a parting only where the eager run's top two were
    # that close. A wrong scale or block would miss by nats at once.
    from fleetlm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    graphs = tiny_fp8.generate(_prompts(1), params)
    eager = LLM(model="tiny-llama-8h4kv", load_format="dummy", device="cuda", dtype="bfloat16", max_model_len=512,
                max_num_seqs=8, num_kv_blocks=256, kv_cache_dtype="fp8", enforce_eager=True)
    try:
        assert eager.engine.workers.worker.runner.graphs is None
        ref = eager.generate(_prompts(1), params)
    finally:
        _free(eager)
    for g, r in zip(graphs, ref):
        g, r = g.outputs[0], r.outputs[0]
        for step, (a, b) in enumerate(zip(r.token_ids, g.token_ids)):
            lp_r, lp_g = r.logprobs[step], g.logprobs[step]
            if a == b:
                assert abs(lp_r[a].logprob - lp_g[b].logprob) < 0.3, (step, lp_r, lp_g)
                continue
            assert b in lp_r and lp_r[a].logprob - lp_r[b].logprob < 0.3, (step, lp_r, lp_g)
            break
