"""Multi-LoRA shrink and expand over token segments grouped by adapter (SGMV; BGMV at decode sizes).

Each LoRA-adapted projection holds, per device slot ``s``, an ``A`` stack
``lora_a[s]`` of ``n_slices * r`` rows (one block of ``r`` per fused
projection: q, k, v; gate, up; a single one otherwise; ranks below ``r``
zero-padded) and a ``B`` stack ``lora_b[s]`` of ``N x r`` (column ``n``
belongs to the slice ``c(n)`` whose output features hold it). For every
token ``t`` whose request runs with the adapter in slot ``s(t)`` (base-model
tokens have none)::

    shrink:  h[t, :]  = x[t, :] @ lora_a[s(t)]^T                      fp32, [n_slices * r]
    expand:  y[t, n] += scale[s(t)] * (h[t, c(n)r : c(n)r + r] @ lora_b[s(t), n, :]^T)

the second fused into adding onto the base projection's output ``y``
(PEFT's ``base(x) + lora_B(lora_A(x)) * scaling``, the scaling kept apart).

Tokens are visited through a *tile table* built on the host each step
(:func:`build_tile_table`): the adapted tokens sorted by slot (stable), each
slot's run cut into tiles of ``block_m`` tokens; a tile has one slot, so a
program reads its adapter's weights once for up to ``block_m`` tokens
(SGMV); a decode batch is tiles of 16 requests (BGMV-like at batch 1). The
launch grid is a function of the row count only (``num_tiles(rows, slots)``:
unused tiles have slot -1 and return at once), and no length is a kernel
argument, so a CUDA graph captured for a batch size replays for any mix of
adapters, and no sequence length triggers a recompile. The shrink splits
``K`` over ``split_k`` programs (small batches would otherwise leave the GPU
idle) into fp32 partials that the expand sums: no atomics, deterministic.

Cost per adapted token and projection (``K`` in, ``N`` out, rank ``r``):
``2 r (n_slices K + N)`` FLOPs; weight bytes ``(n_slices r K + N r) *
elem`` once per tile. Rank 16 on all seven projections of Llama-3.1-8B is
84 MB of bf16 per adapter (0.5% of the base weights): at decode the extra
bytes are the distinct adapters' weights, at prefill the extra FLOPs are
~2% of the base projections'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch references below still work.
    HAS_TRITON = False


def block_m(rows: int) -> int:
    """Tokens per tile: 16 for decode-sized steps, 64 for prefills."""
    return 16 if rows <= 256 else 64


def num_tiles(rows: int, num_slots: int) -> int:
    """Tiles (programs along the token axis) for a step of ``rows`` tokens: enough for any
    split of them over ``num_slots`` adapters (a run of ``n`` tokens takes ``n // block_m + 1``
    tiles at most, and there are at most ``min(rows, num_slots)`` runs)."""
    return rows // block_m(rows) + min(rows, num_slots)


def tile_capacity(max_rows: int, num_slots: int) -> int:
    """Tiles a table must hold for any step of up to ``max_rows`` rows (tiles grow 4x at 257 rows)."""
    return max(num_tiles(min(max_rows, 256), num_slots), num_tiles(max_rows, num_slots))


def split_k(rows: int, k: int) -> int:
    """Shrink programs along K: ~128 programs in all for small steps, one split for prefills.

    Every expand program re-reads its tile's partials once per split, so only a
    decode of <= 16 rows (one tile per adapter) takes more than 4.
    """
    tiles = max(1, -(-rows // block_m(rows)))
    want = max(1, min(16 if rows <= 16 else 4, k // 256, -(-128 // tiles)))
    return -(-k // _k_per_split(k, want))  # splits of whole K blocks (fewer when they round up)


_BLOCK_K = 64


def _k_per_split(k: int, splits: int) -> int:
    return -(-k // (splits * _BLOCK_K)) * _BLOCK_K


def shrink_shape(rows: int, k: int, r: int) -> tuple[int, int, int]:
    """Shape of :func:`lora_shrink`'s output, for a caller that allocates it (``out=``)."""
    return split_k(rows, k), rows, r


def expand_blocks(rows: int) -> tuple[int, int]:
    """(BLOCK_N, column blocks per program) of the expand: a program loads its tile's
    partials once and walks 256 output features with them."""
    return (64, 4) if rows <= 256 else (128, 2)


@dataclass
class LoRABatch:
    """A step's tile table on the device (see the module docstring); capacity-sized buffers."""

    token_idx: torch.Tensor  # [rows cap] int32: adapted tokens' rows, sorted by slot
    tile_slot: torch.Tensor  # [tiles cap] int32: the tile's slot, -1 for an unused tile
    tile_start: torch.Tensor  # [tiles cap] int32: first entry of token_idx in the tile
    tile_end: torch.Tensor  # [tiles cap] int32: end of the tile's slot run in token_idx (the tile stops at
    #                        min(start + block_m, end))
    scale: torch.Tensor  # [slots] float32: each slot's lora_alpha / r (or / sqrt(r))
    # The torch references' view of the same table, when the host already has it (else read back).
    host_runs: list | None = None


def build_tile_table(token_slot: np.ndarray, rows: int, num_slots: int):
    """Host side: (token_idx, tile_slot, tile_start, tile_end) int32 arrays for one step.

    ``token_slot[t]`` is token ``t``'s slot (-1: base model); ``rows`` is the
    row count the forward will see (a CUDA graph's padded batch), so the
    table has ``num_tiles(rows, num_slots)`` entries.
    """
    bm = block_m(rows)
    adapted = np.flatnonzero(token_slot >= 0)
    order = adapted[np.argsort(token_slot[adapted], kind="stable")].astype(np.int32)
    slots = token_slot[order]
    n_tiles = num_tiles(rows, num_slots)
    tile_slot = np.full(n_tiles, -1, dtype=np.int32)
    tile_start = np.zeros(n_tiles, dtype=np.int32)
    tile_end = np.zeros(n_tiles, dtype=np.int32)
    if order.size:
        bounds = np.flatnonzero(np.diff(slots)) + 1
        run_lo = np.concatenate([[0], bounds])
        run_hi = np.concatenate([bounds, [order.size]])
        per_run = -(-(run_hi - run_lo) // bm)
        run_of_tile = np.repeat(np.arange(run_lo.size), per_run)
        first_tile = np.concatenate([[0], np.cumsum(per_run)[:-1]])
        used = run_of_tile.size
        tile_slot[:used] = slots[run_lo[run_of_tile]]
        tile_start[:used] = run_lo[run_of_tile] + (np.arange(used) - first_tile[run_of_tile]) * bm
        tile_end[:used] = run_hi[run_of_tile]
    return order, tile_slot, tile_start, tile_end


if HAS_TRITON:

    @triton.jit
    def _tile_tokens(token_idx_ptr, tile_start_ptr, tile_end_ptr, tile, BLOCK_M: tl.constexpr):
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        rm = start + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        tok = tl.load(token_idx_ptr + rm, mask=m_mask, other=0).to(tl.int64)
        return tok, m_mask

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, out_ptr, token_idx_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                       K, R, K_PER_SPLIT, stride_xm, stride_as, stride_ar, stride_os, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
        tile = tl.program_id(0)
        split = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile)
        if slot >= 0:
            tok, m_mask = _tile_tokens(token_idx_ptr, tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
            rr = tl.arange(0, BLOCK_R)
            r_mask = rr < R
            rk = tl.arange(0, BLOCK_K)
            a_base = a_ptr + slot.to(tl.int64) * stride_as
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            k_lo = split * K_PER_SPLIT
            k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + rk
                k_mask = kk < k_hi
                x = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_base + rr[None, :] * stride_ar + kk[:, None],
                            mask=r_mask[None, :] & k_mask[:, None], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    a = a.to(tl.float32)
                acc += tl.dot(x, a, input_precision=PRECISION)
            tl.store(out_ptr + split * stride_os + tok[:, None] * stride_om + rr[None, :], acc,
                     mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _load_h(h_ptr, tok, m_mask, rr, r_mask, c, RANK, SPLITS, stride_hs, stride_hm):
        """Slice ``c`` of the tile's shrink output, its split-K partials summed: [BLOCK_M, BLOCK_R] fp32."""
        h_ptrs = h_ptr + tok[:, None] * stride_hm + c * RANK + rr[None, :]
        h = tl.load(h_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        for s in range(1, SPLITS):
            h += tl.load(h_ptrs + s * stride_hs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        return h

    @triton.jit
    def _expand_kernel(y_ptr, h_ptr, b_ptr, scale_ptr, token_idx_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                       N, RANK, SPLITS, S1, S2, stride_ym, stride_hs, stride_hm, stride_bs, stride_bn,
                       N_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       N_CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile)
        if slot >= 0:
            tok, m_mask = _tile_tokens(token_idx_ptr, tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
            rr = tl.arange(0, BLOCK_R)
            r_mask = rr < RANK
            # Rounded to the activations' dtype first, as PEFT's lora_B sees lora_A's output.
            y_dtype = y_ptr.dtype.element_ty
            b_dtype = b_ptr.dtype.element_ty
            if UPCAST:
                b_dtype = tl.float32
            h0 = _load_h(h_ptr, tok, m_mask, rr, r_mask, 0, RANK, SPLITS, stride_hs, stride_hm)
            h0 = h0.to(y_dtype).to(b_dtype)
            h1 = h0
            h2 = h0
            if N_SLICES > 1:
                h1 = _load_h(h_ptr, tok, m_mask, rr, r_mask, 1, RANK, SPLITS, stride_hs, stride_hm)
                h1 = h1.to(y_dtype).to(b_dtype)
            if N_SLICES > 2:
                h2 = _load_h(h_ptr, tok, m_mask, rr, r_mask, 2, RANK, SPLITS, stride_hs, stride_hm)
                h2 = h2.to(y_dtype).to(b_dtype)
            scale = tl.load(scale_ptr + slot)
            b_base = b_ptr + slot.to(tl.int64) * stride_bs
            for chunk in tl.static_range(N_CHUNKS):
                rn = (pid_n * N_CHUNKS + chunk) * BLOCK_N + tl.arange(0, BLOCK_N)
                n_mask = rn < N
                b = tl.load(b_base + rn[None, :] * stride_bn + rr[:, None], mask=r_mask[:, None] & n_mask[None, :],
                            other=0.0).to(b_dtype)  # [BLOCK_R, BLOCK_N]
                # Output features [0, S1) are slice 0, [S1, S2) slice 1, [S2, N) slice 2 (S1 = S2 = N when absent).
                acc = tl.where((rn < S1)[None, :], tl.dot(h0, b, input_precision=PRECISION), 0.0)
                if N_SLICES > 1:
                    acc += tl.where(((rn >= S1) & (rn < S2))[None, :], tl.dot(h1, b, input_precision=PRECISION), 0.0)
                if N_SLICES > 2:
                    acc += tl.where((rn >= S2)[None, :], tl.dot(h2, b, input_precision=PRECISION), 0.0)
                y_ptrs = y_ptr + tok[:, None] * stride_ym + rn[None, :]
                mask = m_mask[:, None] & n_mask[None, :]
                y = tl.load(y_ptrs, mask=mask, other=0.0)
                tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y_dtype), mask=mask)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _dot_mode(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(upcast operands to float32, tl.dot input_precision): as ``attention._dot_mode``.

    float32 needs "ieee" (tf32 loses ~3 digits); triton 3.9's CPU interpreter
    multiplies bfloat16 dots as raw bits, so there they are upcast first.
    """
    upcast = device.type == "cpu" and dtype == torch.bfloat16
    return upcast, "ieee" if (dtype == torch.float32 or upcast) else "tf32"


def _check(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [tokens, in_features] with unit column stride, got {tuple(x.shape)}")
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1] or not lora_a.is_contiguous():
        raise ValueError(f"lora_a must be contiguous [slots, n_slices * r, {x.shape[1]}], got {tuple(lora_a.shape)}")
    if lora_a.dtype != x.dtype:
        raise ValueError(f"lora_a dtype {lora_a.dtype} != activations' {x.dtype}")
    for name in ("token_idx", "tile_slot", "tile_start", "tile_end"):
        t = getattr(batch, name)
        if t.dtype != torch.int32 or t.device != x.device:
            raise ValueError(f"batch.{name} must be int32 on {x.device}")
    rows, slots = x.shape[0], lora_a.shape[0]
    if batch.token_idx.numel() < rows or batch.tile_slot.numel() < num_tiles(rows, slots):
        raise ValueError(f"the tile table holds {batch.tile_slot.numel()} tiles / {batch.token_idx.numel()} rows, "
                         f"a step of {rows} rows needs {num_tiles(rows, slots)} / {rows}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """fp32 partials ``[splits, T, n_slices * r]`` of ``x @ lora_a[slot]^T`` (rows of base tokens: undefined),
    into ``out`` if given (of :func:`shrink_shape`)."""
    _check(x, lora_a, batch)
    rows, k = x.shape
    slots, r = lora_a.shape[0], lora_a.shape[1]
    shape = shrink_shape(rows, k, r)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.stride(2) != 1:
        raise ValueError(f"out must be float32 {shape} with unit last stride, got {out.dtype} {tuple(out.shape)}")
    if rows == 0:
        return out
    bk, splits = _BLOCK_K, shape[0]
    upcast, precision = _dot_mode(x.dtype, x.device)
    k_per = _k_per_split(k, splits)
    _shrink_kernel[(num_tiles(rows, slots), splits)](
        x, lora_a, out, batch.token_idx, batch.tile_slot, batch.tile_start, batch.tile_end,
        k, r, k_per, x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m(rows), BLOCK_K=bk, BLOCK_R=_pow2(r), UPCAST=upcast, PRECISION=precision, num_warps=4,
    )
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                slices: tuple[int, ...]) -> torch.Tensor:
    """``y[t, n] += scale * h[:, t, slice(n)] @ lora_b[slot, n]^T`` in place; returns ``y``.

    ``slices``: the output features of each fused projection (summing to ``N``).
    """
    rows, n = y.shape
    slots, rank = lora_b.shape[0], lora_b.shape[2]
    if lora_b.shape[1] != n or sum(slices) != n or len(slices) > 3 or not lora_b.is_contiguous():
        raise ValueError(f"lora_b {tuple(lora_b.shape)} and slices {slices} do not fit an output of {n} features")
    if h.dim() != 3 or h.shape[1] != rows or h.shape[2] != len(slices) * rank or h.dtype != torch.float32:
        raise ValueError(f"h must be fp32 [splits, {rows}, {len(slices) * rank}], got {h.dtype} {tuple(h.shape)}")
    if y.stride(1) != 1 or lora_b.dtype != y.dtype:
        raise ValueError("y must have unit column stride and lora_b its dtype")
    if rows == 0:
        return y
    bounds = list(np.cumsum(slices)[:-1]) + [n, n]
    bn, chunks = expand_blocks(rows)
    upcast, precision = _dot_mode(y.dtype, y.device)
    _expand_kernel[(num_tiles(rows, slots), triton.cdiv(n, bn * chunks))](
        y, h, lora_b, batch.scale, batch.token_idx, batch.tile_slot, batch.tile_start, batch.tile_end,
        n, rank, h.shape[0], int(bounds[0]), int(bounds[1]), y.stride(0), h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        N_SLICES=len(slices), BLOCK_M=block_m(rows), BLOCK_N=bn, N_CHUNKS=chunks, BLOCK_R=_pow2(rank),
        UPCAST=upcast, PRECISION=precision, num_warps=4,
    )
    return y


def table_runs(order: np.ndarray, tile_slot: np.ndarray, tile_start: np.ndarray, tile_end: np.ndarray) -> list:
    """(slot, rows) per run of one slot in a tile table; rows a slice where the run's tokens are contiguous."""
    runs: dict[tuple[int, int], int] = {}
    for s, lo, hi in zip(tile_slot.tolist(), tile_start.tolist(), tile_end.tolist()):
        if s >= 0:
            runs[s, hi] = min(lo, runs.get((s, hi), lo))
    out = []
    for (s, hi), lo in runs.items():
        rows = order[lo:hi]
        contiguous = int(rows[-1]) - int(rows[0]) == hi - lo - 1
        out.append((s, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else torch.from_numpy(rows.astype(np.int64))))
    return out


def _segments(batch: LoRABatch, rows: int, slots: int) -> list:
    if batch.host_runs is not None:
        return batch.host_runs
    n = num_tiles(rows, slots)
    return table_runs(batch.token_idx.cpu().numpy(), batch.tile_slot[:n].cpu().numpy(),
                      batch.tile_start[:n].cpu().numpy(), batch.tile_end[:n].cpu().numpy())


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Torch reference of :func:`lora_shrink` (the whole sum in the first split, the others zero)."""
    _check(x, lora_a, batch)
    if out is None:
        out = torch.zeros((1, x.shape[0], lora_a.shape[1]), dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    for slot, rows in _segments(batch, x.shape[0], lora_a.shape[0]):
        rows = rows if isinstance(rows, slice) else rows.to(x.device)
        out[0, rows] = (x[rows] @ lora_a[slot].t()).float()
    return out


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch,
                    slices: tuple[int, ...]) -> torch.Tensor:
    """Torch reference of :func:`lora_expand`: PEFT's ``y + (h @ B^T) * scaling`` per slice."""
    rank = lora_b.shape[2]
    h = h.sum(0) if h.shape[0] > 1 else h[0]
    scales = batch.scale.tolist()
    for slot, rows in _segments(batch, y.shape[0], lora_b.shape[0]):
        rows = rows if isinstance(rows, slice) else rows.to(y.device)
        hs, lo, parts = h[rows].to(y.dtype).to(lora_b.dtype), 0, []
        for c, width in enumerate(slices):
            parts.append(hs[:, c * rank:(c + 1) * rank] @ lora_b[slot, lo:lo + width].t())
            lo += width
        delta = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)) * scales[slot]
        if isinstance(rows, slice):
            y[rows] += delta.to(y.dtype)
        else:
            y.index_add_(0, rows, delta.to(y.dtype))
    return y


__all__ = ["HAS_TRITON", "LoRABatch", "block_m", "build_tile_table", "lora_expand", "lora_expand_ref",
           "lora_shrink", "lora_shrink_ref", "num_tiles", "shrink_shape", "split_k", "table_runs", "tile_capacity"]
