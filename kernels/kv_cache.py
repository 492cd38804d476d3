"""Store the step's new keys and values into the paged KV cache.

For each token ``t`` with ``slot = slot_mapping[t] >= 0``::

    k_cache[slot // block_size, slot % block_size] = k[t]     # [KH, D]
    v_cache[slot // block_size, slot % block_size] = v[t]

Tokens with ``slot == -1`` are skipped (padding, or tokens whose KV is already
cached). In place; nothing is returned.

Cost per stored token: read and write ``2 * KH * D`` elements (plus 8 bytes of
slot); no FLOPs. Memory bound; one program per token.
"""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference below still works.
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _store_kv_cache_kernel(
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        num_kv_heads,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_P: tl.constexpr,
        KV_HEADS_P: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot < 0:
            return
        heads = tl.arange(0, KV_HEADS_P)
        offs_d = tl.arange(0, HEAD_DIM_P)
        mask = (heads[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
        # The cache is contiguous: slot * (KH * D) addresses [block, offset].
        dst = slot * num_kv_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, KH, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, KH, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape[2:])} != k's {tuple(k.shape[1:])}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes differ: k {k.dtype}, v {v.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 of shape ({k.shape[0]},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v must have a unit-stride last dim")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def store_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton scatter of ``k``/``v`` rows into their cache slots (in place)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
        KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )


def store_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Torch reference: ``index_copy_`` into the cache viewed as ``[slots, KH, D]``."""
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)
