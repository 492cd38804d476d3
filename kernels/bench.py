"""Micro-benchmarks of the Triton kernels against their torch references and SDPA.

``bench_kernels()`` times each op at Llama-3-8B shapes (32 query heads, 8 KV
heads, head_dim 128, hidden 4096, intermediate 14336, bf16) with CUDA events
and reports milliseconds plus GB/s (memory-bound ops: bytes that must move /
time) or TFLOP/s (prefill attention: ``4 * H * D * n_pairs`` / time). Paged
attention is also compared with ``torch.nn.functional.scaled_dot_product_attention``
on the same K/V laid out densely (no paging), i.e. the flash kernel's speed.

Run on a GPU machine: ``python -m fleetlm.kernels.bench`` (prints JSON).
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fleetlm.kernels import activation, attention, gemv, kv_cache, rmsnorm, rotary


@dataclass
class PagedBatch:
    """A synthetic attention step over a paged cache (random blocks, random contents)."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float
    max_seqlen_q: int
    max_seqlen_k: int

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.block_tables, self.scale,
                self.max_seqlen_q, self.max_seqlen_k)

    def num_pairs(self) -> int:
        """(query, key) pairs attended, summed over requests."""
        q_lens = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).tolist()
        return sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(q_lens, self.seq_lens.tolist()))

    def kv_bytes(self) -> int:
        """Bytes of K and V each request's context holds (what decode must read)."""
        per_token = 2 * self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        return int(self.seq_lens.sum()) * per_token

    def dense_kv(self, request: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request's K, V as [KH, seq_len, D] (for SDPA)."""
        seq_len = int(self.seq_lens[request])
        blocks = self.block_tables[request, : math.ceil(seq_len / self.k_cache.shape[1])].long()
        k = self.k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        v = self.v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        return k, v


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    block_size: int = 16,
    seed: int = 0,
) -> PagedBatch:
    """Random q and cache; each request's blocks are a random, non-contiguous subset."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 1
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    block_tables = torch.zeros(len(q_lens), max(blocks_per_req), dtype=torch.int32, device=device)
    offset = 0
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = perm[offset : offset + n]
        offset += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen, device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return PagedBatch(
        q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables,
        scale=head_dim**-0.5, max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
    )


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of the device work of one call, timed with CUDA events.

    Before each timed call the L2 cache is flushed by zeroing a 256 MiB
    buffer; all calls are queued before one synchronize. The flush keeps the
    device busy while the host launches the call, so the figure is the
    kernel's own time, not the host's launch latency (as in a model, where
    kernels queue behind each other or replay from a CUDA graph). Timing
    each call from an idle device instead adds ~40 us of Python launch
    overhead: it made a 0.09 ms RMSNorm look like 1.9 TB/s instead of 2.8.
    """
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def _entry(shape: str, bytes_moved: int | None, flops: int | None, **times_ms: float | None) -> dict:
    entry: dict = {"shape": shape}
    for name, ms in times_ms.items():
        if ms is None:
            continue
        entry[f"{name}_ms"] = round(ms, 4)
        if bytes_moved:
            entry[f"{name}_gbps"] = round(bytes_moved / ms / 1e6, 1)
        if flops:
            entry[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
    return entry


def _sdpa_dense(batch: PagedBatch) -> tuple[Callable[[], object] | None, str]:
    """SDPA over the same K/V stored densely, [B, H, S, D] (requests must share q_len and seq_len).

    Returns the call and the backend: "flash" when the flash kernel takes these
    inputs, else "auto" (SDPA's own choice).
    """
    q_lens = (batch.cu_seqlens_q[1:] - batch.cu_seqlens_q[:-1]).tolist()
    seq_lens = batch.seq_lens.tolist()
    if len(set(q_lens)) != 1 or len(set(seq_lens)) != 1 or q_lens[0] not in (1, seq_lens[0]):
        return None, "none"
    num_reqs, q_len = len(q_lens), q_lens[0]
    q = batch.q.view(num_reqs, q_len, *batch.q.shape[1:]).transpose(1, 2).contiguous()
    kv = [batch.dense_kv(i) for i in range(num_reqs)]
    k = torch.stack([k for k, _ in kv]).contiguous()
    v = torch.stack([v for _, v in kv]).contiguous()
    gqa = q.shape[1] != k.shape[1]

    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=batch.scale, enable_gqa=gqa)

    try:  # the flash kernel when it takes these inputs; else whatever SDPA picks
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            run()

        def flash():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return run()

        return flash, "flash"
    except RuntimeError:
        return run, "auto"


def bench_attention(name: str, batch: PagedBatch, iters: int) -> dict:
    triton_ms = time_ms(lambda: attention.paged_attention(*batch.args()), iters=iters)
    ref_ms = time_ms(lambda: attention.paged_attention_ref(*batch.args()), warmup=1, iters=max(3, iters // 5))
    sdpa, sdpa_backend = _sdpa_dense(batch)
    sdpa_ms = time_ms(sdpa, iters=iters) if sdpa is not None else None
    decode = batch.max_seqlen_q == 1
    num_heads, head_dim = batch.q.shape[1:]
    entry = _entry(
        name,
        batch.kv_bytes() if decode else None,
        None if decode else 4 * num_heads * head_dim * batch.num_pairs(),
        triton=triton_ms, torch_ref=ref_ms, sdpa_dense=sdpa_ms,
    )
    entry["sdpa_backend"] = sdpa_backend
    if decode:
        entry["num_splits"] = attention.default_decode_config(
            batch.q, batch.seq_lens.shape[0], batch.k_cache.shape[2], batch.max_seqlen_k
        ).num_splits
    return entry


def bench_kernels(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, iters: int = 20, quick: bool = False
) -> dict:
    """Time every kernel (Triton vs torch reference, attention also vs dense SDPA).

    ``quick`` shrinks token counts and contexts (a smoke run); the default
    shapes are the ones to report.
    """
    dev = torch.device(device)
    hidden, inter, num_heads, num_kv_heads, head_dim = 4096, 14336, 32, 8, 128
    tokens = 1024 if quick else 8192
    e = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=dev, dtype=dtype)  # noqa: E731
    results: dict = {
        "device": torch.cuda.get_device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    kernels: dict = {}

    x, residual, weight = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
    kernels["rms_norm"] = _entry(
        f"[{tokens}, {hidden}]", 2 * tokens * hidden * e, None,
        triton=time_ms(lambda: rmsnorm.rms_norm(x, weight, 1e-5), iters=iters),
        torch_ref=time_ms(lambda: rmsnorm.rms_norm_ref(x, weight, 1e-5), iters=iters),
    )
    kernels["fused_add_rms_norm"] = _entry(
        f"[{tokens}, {hidden}]", 4 * tokens * hidden * e, None,
        triton=time_ms(lambda: rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-5), iters=iters),
        torch_ref=time_ms(lambda: rmsnorm.fused_add_rms_norm_ref(x, residual, weight, 1e-5), iters=iters),
    )

    qkv = randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 8192, (tokens,), generator=gen, device=dev)
    angles = torch.rand(8192, head_dim // 2, generator=gen, device=dev) * 6.3
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    kernels["rotary_embedding"] = _entry(
        f"T={tokens} H={num_heads} KH={num_kv_heads} D={head_dim}",
        2 * tokens * (num_heads + num_kv_heads) * head_dim * e, None,
        triton=time_ms(lambda: rotary.rotary_embedding(positions, q, k, cos_sin), iters=iters),
        torch_ref=time_ms(lambda: rotary.rotary_embedding_ref(positions, q, k, cos_sin), iters=iters),
    )

    gate_up = randn(tokens, 2 * inter)
    kernels["silu_and_mul"] = _entry(
        f"[{tokens}, {2 * inter}]", 3 * tokens * inter * e, None,
        triton=time_ms(lambda: activation.silu_and_mul(gate_up), iters=iters),
        torch_ref=time_ms(lambda: activation.silu_and_mul_ref(gate_up), iters=iters),
    )

    num_blocks = tokens // 16 + 1
    k_cache = randn(num_blocks, 16, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, 16, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * 16, generator=gen, device=dev)[:tokens]
    kernels["store_kv_cache"] = _entry(
        f"T={tokens} KH={num_kv_heads} D={head_dim}", 4 * tokens * num_kv_heads * head_dim * e, None,
        triton=time_ms(lambda: kv_cache.store_kv_cache(k, v, k_cache, v_cache, slots), iters=iters),
        torch_ref=time_ms(lambda: kv_cache.store_kv_cache_ref(k, v, k_cache, v_cache, slots), iters=iters),
    )
    del k_cache, v_cache, qkv, gate_up

    # Batch-1 decode projections (weight streaming): split-free GEMV vs cuBLAS.
    x1 = randn(1, hidden)
    projections = {"qkv": (6144, hidden), "o_proj": (hidden, hidden), "gate_up": (2 * inter, hidden),
                   "down_proj": (hidden, inter), "lm_head": (128256, hidden)}
    for name, (n, k_dim) in projections.items():
        if quick and n * k_dim > (1 << 26):
            continue
        w = randn(n, k_dim)
        xk = x1 if k_dim == hidden else randn(1, k_dim)
        kernels[f"gemv_{name}"] = _entry(
            f"[1, {k_dim}] x [{n}, {k_dim}]^T", n * k_dim * e, None,
            triton=time_ms(lambda: gemv.linear(xk, w), iters=iters),
            cublas=time_ms(lambda: F.linear(xk, w), iters=iters),
        )
        if name == "gate_up":
            kernels["gemv_gate_up_silu_mul"] = _entry(
                f"[1, {k_dim}] x [{n}, {k_dim}]^T, silu(gate) * up", n * k_dim * e, None,
                triton=time_ms(lambda: gemv.linear_silu_mul(xk, w), iters=iters),
                cublas=time_ms(lambda: activation.silu_and_mul(F.linear(xk, w)), iters=iters),
            )
        del w

    shape = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=dev)
    decode_reqs, decode_ctx = (8, 1024) if quick else (64, 4096)
    cases = {
        f"paged_decode_{decode_reqs}x{decode_ctx}": ([1] * decode_reqs, [decode_ctx] * decode_reqs),
        f"paged_decode_1x{4 * decode_ctx}": ([1], [4 * decode_ctx]),
        "paged_prefill_4x2048" if not quick else "paged_prefill_2x512": (
            ([2048] * 4, [2048] * 4) if not quick else ([512] * 2, [512] * 2)
        ),
        "paged_chunked_prefill_4x1024_after_3072": (
            ([1024] * 4, [4096] * 4) if not quick else ([256] * 2, [1024] * 2)
        ),
    }
    for name, (q_lens, seq_lens) in cases.items():
        batch = make_paged_batch(q_lens, seq_lens, **shape)
        kernels[name] = bench_attention(name, batch, iters)
        del batch
        torch.cuda.empty_cache()
    results["kernels"] = kernels
    return results


if __name__ == "__main__":
    print(json.dumps(bench_kernels(), indent=2))
