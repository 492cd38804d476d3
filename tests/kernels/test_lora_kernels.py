"""Multi-LoRA shrink / expand (kernels/lora.py): Triton vs torch reference vs a per-token loop, odd shapes."""

import numpy as np
import pytest
import torch

from fleetlm.kernels.lora import (
    LoRABatch,
    block_m,
    build_tile_table,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    num_tiles,
    split_k,
)

requires_triton = pytest.mark.triton


def test_tile_table_groups_tokens_by_slot_and_cuts_tiles():
    # 40 rows (tiles of 16): slot 2 has 18 tokens (two tiles), slot 0 three, base tokens none.
    token_slot = np.array([2] * 10 + [-1] * 5 + [0] * 3 + [2] * 8 + [-1] * 14, dtype=np.int32)
    order, tile_slot, tile_start, tile_end = build_tile_table(token_slot, 40, num_slots=4)
    assert block_m(40) == 16 and tile_slot.size == num_tiles(40, 4) == 40 // 16 + 4
    assert order.tolist() == [15, 16, 17] + list(range(10)) + list(range(18, 26))
    assert tile_slot.tolist() == [0, 2, 2, -1, -1, -1]
    assert tile_start.tolist()[:3] == [0, 3, 19] and tile_end.tolist()[:3] == [3, 21, 21]


def test_tile_table_fits_any_split_of_the_rows():
    rng = np.random.default_rng(0)
    for rows in (1, 7, 16, 255, 256, 257, 1000):
        for slots in (1, 3, 8):
            token_slot = rng.integers(-1, slots, size=rows).astype(np.int32)
            _, tile_slot, tile_start, tile_end = build_tile_table(token_slot, rows, slots)
            used = tile_slot >= 0
            covered = sum(min(e, s + block_m(rows)) - s for s, e in zip(tile_start[used], tile_end[used]))
            assert covered == int((token_slot >= 0).sum()) and tile_slot.size == num_tiles(rows, slots)


def _batch(token_slot, rows, slots, scale, device):
    order, tile_slot, tile_start, tile_end = build_tile_table(np.asarray(token_slot, dtype=np.int32), rows, slots)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)  # noqa: E731
    return LoRABatch(t(np.concatenate([order, -np.ones(rows - order.size, np.int32)])), t(tile_slot), t(tile_start),
                     t(tile_end), torch.tensor(scale, dtype=torch.float32, device=device))


def _case(rows, k, slices, rank, slots, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(slices)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    a = (torch.randn(slots, len(slices) * rank, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    b = torch.randn(slots, n, rank, generator=gen).to(dtype).to(device)
    y = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    token_slot = torch.randint(-1, slots, (rows,), generator=gen).tolist()
    scale = [0.5 + s for s in range(slots)]
    return x, a, b, y, token_slot, scale


def _per_token(x, a, b, y, token_slot, scale, slices, rank):
    """y + scale * (x A^T)_slice B^T, one token at a time, in float64."""
    out = y.double().clone()
    for t, s in enumerate(token_slot):
        if s < 0:
            continue
        h = x[t].double() @ a[s].double().t()
        lo = 0
        for c, width in enumerate(slices):
            out[t, lo:lo + width] += scale[s] * (b[s, lo:lo + width].double() @ h[c * rank:(c + 1) * rank])
            lo += width
    return out


@pytest.mark.parametrize("slices", [(37,), (40, 12, 12), (33, 33)])
def test_reference_matches_per_token_loop(slices):
    x, a, b, y, token_slot, scale = _case(23, 70, slices, 8, 3, torch.float32, "cpu")
    batch = _batch(token_slot, 23, 3, scale, "cpu")
    want = _per_token(x, a, b, y, token_slot, scale, slices, 8)
    got = lora_expand_ref(y.clone(), lora_shrink_ref(x, a, batch), b, batch, slices)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    base = [t for t, s in enumerate(token_slot) if s < 0]
    assert torch.equal(got[base], y[base])  # base-model tokens untouched, bit for bit


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,slices,rank,slots", [
    (23, 200, (40, 12, 12), 8, 3),  # qkv-like, K not a multiple of the K block, three slices
    (5, 96, (29, 29), 16, 2),  # gate_up-like, a decode-sized batch
    (1, 300, (19,), 4, 1),  # batch-1 decode, rank under the dot's 16
    (300, 64, (24,), 8, 4),  # a prefill-sized step (tiles of 64)
])
def test_triton_matches_reference(device, dtype, rows, k, slices, rank, slots):
    x, a, b, y, token_slot, scale = _case(rows, k, slices, rank, slots, dtype, device, seed=rows)
    batch = _batch(token_slot, rows, slots, scale, device)
    h = lora_shrink(x, a, batch)
    assert h.shape[1:] == (rows, len(slices) * rank) and 1 <= h.shape[0] <= split_k(rows, k)
    got = lora_expand(y.clone(), h, b, batch, slices)
    want = lora_expand_ref(y.clone(), lora_shrink_ref(x, a, batch), b, batch, slices)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    base = [t for t, s in enumerate(token_slot) if s < 0]
    assert torch.equal(got[base], y[base])


@requires_triton
def test_padded_rows_and_an_unadapted_step(device):
    # A CUDA graph's padded batch: 10 rows, only the first 6 are requests; then a step with no adapter at all.
    x, a, b, y, _, scale = _case(10, 64, (16,), 8, 2, torch.float32, device)
    token_slot = [1, 1, -1, 0, 1, -1] + [-1] * 4
    batch = _batch(token_slot, 10, 2, scale, device)
    got = lora_expand(y.clone(), lora_shrink(x, a, batch), b, batch, (16,))
    want = _per_token(x.cpu(), a.cpu(), b.cpu(), y.cpu(), token_slot, scale, (16,), 8)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-4)
    none = _batch([-1] * 10, 10, 2, scale, device)
    assert torch.equal(lora_expand(y.clone(), lora_shrink(x, a, none), b, none, (16,)), y)


def test_launcher_refuses_mismatched_operands():
    x, a, b, y, token_slot, scale = _case(4, 32, (8,), 4, 2, torch.float32, "cpu")
    batch = _batch(token_slot, 4, 2, scale, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink_ref(x, a.double(), batch)
    with pytest.raises(ValueError, match="lora_a"):
        lora_shrink_ref(x, a[:, :, :16].contiguous(), batch)
    small = _batch(token_slot, 4, 2, scale, "cpu")
    small.tile_slot = small.tile_slot[:1]
    with pytest.raises(ValueError, match="tile table"):
        lora_shrink_ref(x, a, small)


@requires_triton
def test_shrink_into_a_callers_buffer(device):
    # The layer allocates the partials itself when the shrink runs on a side stream (CUDA graphs).
    from fleetlm.kernels.lora import shrink_shape

    x, a, b, y, token_slot, scale = _case(9, 600, (16,), 8, 2, torch.float32, device)
    batch = _batch(token_slot, 9, 2, scale, device)
    h = torch.full(shrink_shape(9, 600, 8), float("nan"), device=device)
    assert lora_shrink(x, a, batch, out=h) is h
    adapted = [t for t, s in enumerate(token_slot) if s >= 0]
    torch.testing.assert_close(h.sum(0)[adapted], lora_shrink_ref(x, a, batch)[0][adapted], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="out must be float32"):
        lora_shrink(x, a, batch, out=torch.empty(1, 9, 8, device=device))
    ref_out = torch.full((1, 9, 8), float("nan"), device=device)
    assert lora_shrink_ref(x, a, batch, out=ref_out) is ref_out and not ref_out.isnan().any()
