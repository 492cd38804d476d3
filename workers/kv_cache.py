"""One worker's paged KV cache: per layer a K and a V block tensor, in the model's dtype or FP8.

``cache_dtype="auto"`` stores K and V in the model's dtype. ``"fp8_e4m3"``
stores one byte per element (E4M3, saturating at +-448) and one float32 scale
per KV head for K and one for V per layer: the block tensors hold twice the
tokens for the same bytes, the store kernel quantizes, the attention kernels
dequantize (``kernels/kv_cache.py``, ``kernels/attention.py``).

Why static per-head scales, and these. E4M3 is a floating-point format: a
scale only decides where values sit in its range (normals from 2^-6 to 448,
then subnormals down to 2^-9); every normal value keeps the same ~3% relative
precision. Measured through the engine on the embedded model (float32, the
scored text of ``tests/data``, mean KL per position against the float32
cache; DESIGN.md has the table): one scale of 1.0 per tensor (vLLM's default)
0.042, per-head from the bound below 0.041, per-tensor or per-head calibrated
on other text 0.042-0.056 (worst without headroom: what the calibration never
saw clips), per-token power-of-two scales 0.039. Only exact per-token scales
did better (0.026: each vector's largest element lands exactly on 448), at 2
bytes per token and head (the pool no longer 2x) and a scale load per key in
the decode loop. So static per-head scales: the pool stays exactly 2x, and
they cost nothing inside the kernels (a program owns one KV head: K's scale
folds into the softmax scale, V's multiplies the output once).

Where the scales come from, without calibration data: a bound. A layer's K
and V are ``W (gamma * x_hat) + b`` with ``x_hat`` the RMS-normalized hidden
state, so ``||x_hat|| <= sqrt(hidden)`` and, per output row ``j``,
``|W_j (gamma * x_hat) + b_j| <= ||W_j * gamma|| sqrt(hidden) + |b_j|``; RoPE
rotates K's (d, d + D/2) pairs, so K's bound is that of the pair's norm. Each
head's scale is ``bound / 448`` rounded up to a power of two: nothing ever
saturates, whatever the text; on the embedded model the bound is 3-9x the
largest value seen, which costs a few binades at the bottom and nothing
measurable (per-head scales calibrated on the scored text itself: 0.044).
Power-of-two
scales make quantizing and dequantizing exact multiplications, so the Triton
kernels and their torch references store and read the same bits. The rows
come from the projection itself (``qkv_proj`` applied to ``diag(gamma)``
minus its value at zero): any weight format, any tensor-parallel shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fleetlm.kernels.kv_cache import FP8_DTYPE, FP8_MAX

# Rounding of the bound's own arithmetic (a bf16 GEMM) must not put it below a real value.
_BOUND_SLACK = 1.02


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's cache: ``k``/``v`` ``[num_blocks, block_size, KH, D]``; scales float32 ``[KH]`` for FP8."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def kv_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return FP8_DTYPE if cache_dtype == "fp8_e4m3" else model_dtype


def check_fp8_kv_supported(device: torch.device) -> None:
    """E4M3 conversions need compute capability 8.9 (Ada, Hopper) on CUDA: say so at start, not at a request."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"kv_cache_dtype='fp8' needs a GPU with FP8 (E4M3) support, compute capability >= 8.9 "
                             f"(Ada, Hopper or newer); {name} has {major}.{minor}: use kv_cache_dtype='auto'")


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       cache_dtype: str, model_dtype: torch.dtype) -> int:
    """Bytes of one block in every layer, K and V (the per-head scales are a constant beside the pool)."""
    elem = torch.tensor([], dtype=kv_torch_dtype(cache_dtype, model_dtype)).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def allocate(layers, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, cache_dtype: str,
             model_dtype: torch.dtype, device: torch.device) -> list[LayerKVCache]:
    """Zeroed block tensors for each decoder layer of ``layers`` (FP8: with its scales)."""
    dtype = kv_torch_dtype(cache_dtype, model_dtype)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Scales first: their scratch (a hidden x hidden matmul per layer) is gone before the pool takes the memory.
    scales = [kv_scales(layer) for layer in layers] if dtype == FP8_DTYPE else [(None, None)] * len(layers)

    def zeros() -> torch.Tensor:  # E4M3 zero is the zero byte; not every device fills float8 tensors
        if device.type == "cpu":
            # calloc'd (numpy's zeros): the OS hands out zero pages as they are first touched, where
            # torch.zeros writes every byte up front (2.7 s for the default 2 GiB pool).
            raw = np.zeros(shape, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32}[dtype.itemsize])
            return torch.from_numpy(raw).view(dtype)
        if dtype == FP8_DTYPE:
            return torch.zeros(shape, dtype=torch.uint8, device=device).view(FP8_DTYPE)
        return torch.zeros(shape, dtype=dtype, device=device)

    return [LayerKVCache(zeros(), zeros(), k_scale, v_scale) for k_scale, v_scale in scales]


@torch.inference_mode()
def kv_bounds(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per local KV head, the largest |K| (after RoPE) and |V| any input can give this decoder layer (float32)."""
    gamma = layer.input_layernorm.weight
    attn = layer.self_attn
    qkv = attn.qkv_proj
    hidden, d = gamma.shape[0], attn.head_dim
    q, kv = qkv.q_size, qkv.kv_size
    bias = qkv(torch.zeros(1, hidden, dtype=gamma.dtype, device=gamma.device))[0, q:].float()
    # [hidden, 2 * kv]: column j is K/V row j of W scaled by gamma (the bias taken off).
    rows = qkv(torch.diag(gamma))[:, q:].float() - bias
    bounds = []
    for lo, rope in ((0, True), (kv, False)):
        norm2 = rows[:, lo:lo + kv].square().sum(0).view(-1, d)  # [KH, D]
        bias2 = bias[lo:lo + kv].square().view(-1, d)
        if rope:  # rotate_half mixes d with d + D/2: bound the pair's norm
            norm2 = (norm2[:, : d // 2] + norm2[:, d // 2:]).repeat(1, 2)
            bias2 = (bias2[:, : d // 2] + bias2[:, d // 2:]).repeat(1, 2)
        bounds.append((norm2.sqrt() * hidden**0.5 + bias2.sqrt()).amax(dim=1))
    return bounds[0], bounds[1]


def scale_for(bound: torch.Tensor) -> torch.Tensor:
    """The power of two at or above ``bound / 448`` (1 for a zero bound: a head that is always 0)."""
    scale = torch.exp2(torch.ceil(torch.log2(bound * _BOUND_SLACK / FP8_MAX)))
    return torch.where(bound > 0, scale, torch.ones_like(scale)).float().contiguous()


def kv_scales(layer) -> tuple[torch.Tensor, torch.Tensor]:
    k_bound, v_bound = kv_bounds(layer)
    return scale_for(k_bound), scale_for(v_bound)
