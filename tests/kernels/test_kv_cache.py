"""store_kv_cache: Triton vs torch reference vs an explicit per-token loop (exact)."""

import pytest
import torch

from fleetlm.kernels.kv_cache import encode_e4m3, store_kv_cache, store_kv_cache_ref

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_BLOCKS, BLOCK_SIZE = 9, 16


def _inputs(num_tokens, num_kv_heads, head_dim, dtype, device, seed=0):
    """k and v as strided views of a fused kv buffer; distinct random slots, a few -1 (skipped)."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_tokens, 2 * num_kv_heads * head_dim, generator=gen).to(dtype).to(device)
    k = kv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[::3] = -1
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(device)
    return k, v, k_cache, v_cache, slots.to(device)


def _store_loop(k, v, k_cache, v_cache, slot_mapping):
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = k[t]
            v_cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = v[t]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_loop(dtype):
    k, v, k_cache, v_cache, slots = _inputs(11, 3, 40, dtype, "cpu")
    k_loop, v_loop = k_cache.clone(), v_cache.clone()
    _store_loop(k, v, k_loop, v_loop, slots)
    store_kv_cache_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_loop) and torch.equal(v_cache, v_loop)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim", [(7, 2, 64), (13, 3, 40)])
def test_store_matches_ref(device, dtype, num_tokens, num_kv_heads, head_dim):
    k, v, k_cache, v_cache, slots = _inputs(num_tokens, num_kv_heads, head_dim, dtype, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots)
    store_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # a copy: bitwise


@requires_triton
def test_store_int32_slots_and_empty(device):
    k, v, k_cache, v_cache, slots = _inputs(5, 2, 64, torch.float16, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots)
    store_kv_cache(k, v, k_cache, v_cache, slots.int())
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    store_kv_cache(k[:0], v[:0], k_cache, v_cache, slots[:0])
    assert torch.equal(k_cache, k_ref)


def test_launcher_rejects_bad_inputs():
    k, v, k_cache, v_cache, slots = _inputs(5, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv_cache(k, v, k_cache, v_cache, slots[:4])
    with pytest.raises(ValueError, match="dtypes"):
        store_kv_cache(k, v, k_cache.half(), v_cache, slots)
    with pytest.raises(ValueError, match="heads"):
        store_kv_cache(k[:, :1], v[:, :1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        store_kv_cache(k, v, k_cache.transpose(0, 1), v_cache.transpose(0, 1), slots)


# --- FP8 (E4M3) cache: quantized with per-head power-of-two scales --------------------------------

FP8 = torch.float8_e4m3fn


def _fp8_inputs(num_tokens, num_kv_heads, head_dim, dtype, device, seed=0):
    """As _inputs, with an FP8 cache, per-head power-of-two scales, and values that saturate (> 448 * scale)
    or fall to E4M3 subnormals (< 2^-6 * scale)."""
    k, v, k_cache, v_cache, slots = _inputs(num_tokens, num_kv_heads, head_dim, dtype, "cpu", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    k_scale = torch.exp2(torch.randint(-6, 3, (num_kv_heads,), generator=gen).float())
    v_scale = torch.exp2(torch.randint(-6, 3, (num_kv_heads,), generator=gen).float())
    spread = torch.exp2(torch.randint(-12, 10, k.shape, generator=gen).float())  # 2^-12 .. 2^9 times N(0, 1)
    k = (k.float() * spread * k_scale.view(-1, 1)).to(dtype)
    v = (v.float() * spread.flip(0) * v_scale.view(-1, 1)).to(dtype)
    k_cache, v_cache = k_cache.to(FP8), v_cache.to(FP8)
    return [t.to(device) for t in (k, v, k_cache, v_cache, slots, k_scale, v_scale)]


def _store_loop_fp8(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    # Quantize one element at a time (Python floats): x / scale, saturated at 448, rounded by torch's cast.
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        for h in range(k.shape[1]):
            for cache, x, s in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
                vals = [min(max(float(e) / float(s[h]), -448.0), 448.0) for e in x[t, h].float().tolist()]
                cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE, h] = torch.tensor(vals).to(FP8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_ref_matches_loop(dtype):
    k, v, k_cache, v_cache, slots, k_scale, v_scale = _fp8_inputs(11, 3, 40, dtype, "cpu")
    k_loop, v_loop = k_cache.clone(), v_cache.clone()
    _store_loop_fp8(k, v, k_loop, v_loop, slots, k_scale, v_scale)
    store_kv_cache_ref(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(k_cache.view(torch.uint8), k_loop.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_loop.view(torch.uint8))
    stored = k_cache.float()
    assert stored.abs().max() == 448.0 and ((stored != 0) & (stored.abs() < 2**-6)).any()  # both ends exercised


def _encoding_cases():
    """Every bfloat16 value, random float32 bit patterns, N(0, 1) over 32 binades, and every E4M3 midpoint."""
    every_bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    spread = torch.randn(200_000, generator=gen) * torch.exp2(torch.randint(-20, 12, (200_000,), generator=gen).float())
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[~grid.isnan()].unique()  # sorted, -0 merged with 0
    mids = (grid[:-1] + grid[1:]) / 2  # ties: to even
    return torch.cat([every_bf16, raw.view(torch.float32), spread, mids, -mids])


def test_encode_e4m3_is_torchs_rounding():
    # The integer encoding the kernel and the reference share = torch's cast (nearest even), saturated.
    x = _encoding_cases()
    want = x.clamp(-448.0, 448.0).to(FP8).view(torch.uint8)
    got = encode_e4m3(x)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} differ, e.g. {x[bad[:4]].tolist()}: {got[bad[:4]].tolist()} vs {want[bad[:4]].tolist()}"


@requires_triton
def test_fp8_store_kernel_encodes_like_torch(device):
    # The same cases through the kernel (as K and V of one KV head, scale 1): the bytes torch's cast gives.
    x = _encoding_cases()
    x = torch.cat([x[:65536], x[-1000:], x[65536:65536 + 1048]])  # every bf16, the midpoints, a few random
    x = x.view(-1, 4, 256)  # few, wide programs: the interpreter is slow per program
    want = x.clamp(-448.0, 448.0).to(FP8).view(torch.uint8)
    num_blocks = -(-x.shape[0] // BLOCK_SIZE)
    caches = [torch.zeros(num_blocks, BLOCK_SIZE, 4, 256, dtype=torch.uint8).view(FP8).to(device) for _ in range(2)]
    one = torch.ones(4, device=device)
    slots = torch.arange(x.shape[0], device=device)
    store_kv_cache(x.to(device), (-x).to(device), *caches, slots, one, one)
    got_k = caches[0].view(torch.uint8).view(-1, 4, 256)[: x.shape[0]].cpu()
    got_v = caches[1].view(torch.uint8).view(-1, 4, 256)[: x.shape[0]].cpu()
    assert torch.equal(got_k, want)
    assert torch.equal(got_v, (-x).clamp(-448.0, 448.0).to(FP8).view(torch.uint8))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim", [(7, 2, 64), (13, 3, 40)])
def test_fp8_store_matches_ref(device, dtype, num_tokens, num_kv_heads, head_dim):
    k, v, k_cache, v_cache, slots, k_scale, v_scale = _fp8_inputs(num_tokens, num_kv_heads, head_dim, dtype, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots, k_scale, v_scale)
    store_kv_cache(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    # Power-of-two scales: the kernel's rounding (to nearest even, saturating) gives the reference's bits.
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))


def test_fp8_launcher_rejects_bad_scales():
    k, v, k_cache, v_cache, slots, k_scale, v_scale = _fp8_inputs(5, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="needs k_scale"):
        store_kv_cache(k, v, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match=r"v_scale must be float32 \[num_kv_heads=2\]"):
        store_kv_cache(k, v, k_cache, v_cache, slots, k_scale, v_scale[:1])
    with pytest.raises(ValueError, match="k_scale must be float32"):
        store_kv_cache(k, v, k_cache, v_cache, slots, k_scale.double(), v_scale)
    with pytest.raises(ValueError, match="are for a"):
        store_kv_cache(k, v, k_cache.float(), v_cache.float(), slots, k_scale, v_scale)
    with pytest.raises(ValueError, match="dtypes differ"):
        store_kv_cache(k, v, k_cache, v_cache.float(), slots, k_scale, v_scale)
