"""GGUF (ggml) quantization blocks -> the ``wq_linear`` layout, and back (for test files and dummy weights).

A GGUF row of K weights is K / B blocks of T bytes (B weights each),
laid out as ggml's ``block_q*`` structs (little-endian):

| type | B | T | bytes | weight |
|---|---|---|---|---|
| Q8_0 | 32 | 34 | d f16, qs int8[32] | d * qs |
| Q4_0 | 32 | 18 | d f16, qs[16]: weight i low nibble of byte i, i+16 high | d * (q - 8) |
| Q4_1 | 32 | 20 | d f16, m f16, qs[16] as Q4_0 | d * q + m |
| Q4_K | 256 | 144 | d, dmin f16, 12 bytes of 6-bit (sc, m) x 8, qs[128] | d*sc_j * q - dmin*m_j (32-weight sub-blocks) |
| Q5_K | 256 | 176 | as Q4_K, plus qh[32] (the 5th bits) before qs | same, q in 0..31 |
| Q6_K | 256 | 210 | ql[128], qh[64], sc int8[16], d f16 | d*sc_j * (q - 32) (16-weight sub-blocks) |

(Nibble and bit orders as in gguf-py's ``gguf.quants``, the reference the
tests compare with.) ``decode`` unpacks the weights into 4-bit (Q8_0: 8-bit
with zero point 128; Q5_K and Q6_K: 8-bit) words, the block scale (and
min) per group, K-quant sub-scales as integers under float32 super-block
scales: the kernel recomputes each weight with gguf-py's own float32
operations, so the result equals ``gguf.quants.dequantize`` exactly.
"""

from __future__ import annotations

import torch

from fleetlm.kernels.wq_linear import QuantWeight
from fleetlm.parallel.formats.packing import pack

QK_K = 256
# type name -> (weights per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210)}
SUPPORTED = tuple(BLOCKS)
TORCH_DEQUANTIZED = ("Q8_0", "Q4_0", "Q4_1")  # the types ``dequantize`` turns into float32 here


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Two bytes per value (little-endian) -> float16 values, leading dims kept."""
    return raw.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """gguf-py's ``qs.reshape(..., -1, 1, chunk) >> [0, 4] & 0xF``: each chunk of bytes -> lows then highs."""
    lead = qs.shape[:-1]
    qs = qs.reshape(*lead, -1, 1, chunk)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(*lead, -1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (gguf-py's get_scale_min)."""
    d, m, m_d = scales.reshape(*scales.shape[:-1], 3, 4).unbind(-2)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def decode(raw: torch.Tensor, qtype: str) -> QuantWeight:
    """``raw`` uint8 ``[N, K / B, T]`` blocks of one GGUF tensor -> a :class:`QuantWeight` of ``[N, K]``."""
    if qtype not in BLOCKS:
        raise ValueError(f"GGUF type {qtype} cannot be kept quantized; supported: {', '.join(SUPPORTED)}")
    b, t = BLOCKS[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 3 or raw.shape[2] != t:
        raise ValueError(f"{qtype} blocks must be uint8 [N, K/{b}, {t}], got {raw.dtype} {tuple(raw.shape)}")
    n, nb = raw.shape[:2]
    if qtype == "Q8_0":
        d = _f16(raw[..., 0:2])
        q = (raw[..., 2:].view(torch.int8).to(torch.int32) + 128).reshape(n, nb * b)
        return _weight(q, 8, d, 32, zero_point=128)
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(raw[..., 0:2])
        first = 4 if qtype == "Q4_1" else 2
        q = _nibbles(raw[..., first:], 16).reshape(n, nb * b)
        if qtype == "Q4_0":
            return _weight(q, 4, d, 32, zero_point=8)
        return _weight(q, 4, d, 32, mins=_f16(raw[..., 2:4]))
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw[..., 0:2]).float(), _f16(raw[..., 2:4]).float()
        sc, mn = _k_scales(raw[..., 4:16])
        if qtype == "Q4_K":
            q, bits = _nibbles(raw[..., 16:], 32), 4
        else:
            qh = raw[..., 16:48].reshape(n, nb, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=raw.device).view(8, 1)
            q, bits = _nibbles(raw[..., 48:], 32) | ((qh & 1).reshape(n, nb, QK_K) << 4), 8
        return _weight(q.reshape(n, nb * b), bits, sc.reshape(n, nb * 8), 32, mins=mn.reshape(n, nb * 8),
                       super_scales=d, super_mins=-dmin)
    # Q6_K
    ql = _nibbles(raw[..., 0:128], 64)
    qh = raw[..., 128:192].reshape(n, nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                                      device=raw.device).view(4, 1)
    q = ql | ((qh & 3).reshape(n, nb, QK_K) << 4)
    sc = raw[..., 192:208].contiguous().view(torch.int8)
    return _weight(q.reshape(n, nb * b), 8, sc.reshape(n, nb * 16), 16, zero_point=32,
                   super_scales=_f16(raw[..., 208:210]).float())


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor | None:
    """float32 ``[N, K]`` of ``raw`` uint8 ``[N, K / B * T]`` rows of Q8_0, Q4_0 or Q4_1 blocks, with
    gguf-py's own float32 operations (so equal to ``gguf.quants.dequantize``, at about twice its
    speed on 2 CPU threads); None for the other types (the loader then uses gguf-py)."""
    if qtype not in TORCH_DEQUANTIZED:
        return None
    b, t = BLOCKS[qtype]
    n = raw.shape[0]
    blocks = raw.reshape(-1, t)
    d = _f16(blocks[:, 0:2]).float().unsqueeze(-1)
    if qtype == "Q8_0":
        return (blocks[:, 2:].view(torch.int8).float() * d).reshape(n, -1)
    first = 4 if qtype == "Q4_1" else 2
    q = _nibbles(blocks[:, first:], 16)
    if qtype == "Q4_0":
        return (d * (q.view(torch.int8) - 8).float()).reshape(n, -1)
    return (d * q.float() + _f16(blocks[:, 2:4]).float().unsqueeze(-1)).reshape(n, -1)


def _weight(q, bits, scales, group, *, zero_point=0, mins=None, super_scales=None, super_mins=None) -> QuantWeight:
    """Per-row ``q [N, K]`` and ``[N, groups]`` scales -> the kernels' K-major layout (words along K, N contiguous)."""

    def kmajor(t):
        return None if t is None else t.t().contiguous()

    return QuantWeight(
        qweight=pack(q.to(torch.int32).t(), bits, 0),
        scales=kmajor(scales),
        bits=bits,
        group=group,
        zero_point=zero_point,
        mins=kmajor(mins),
        super_scales=kmajor(super_scales),
        super_mins=kmajor(super_mins),
        super_group=QK_K if super_scales is not None else 0,
    )


# -- encoding (round to nearest; for test files and dummy weights, not llama.cpp's search) ----------
def encode(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """float ``[N, K]`` -> uint8 ``[N, K / B, T]`` blocks of ``qtype`` (decodable by gguf-py)."""
    if qtype not in BLOCKS:
        raise ValueError(f"cannot encode GGUF type {qtype}; supported: {', '.join(SUPPORTED)}")
    b, _ = BLOCKS[qtype]
    n, k = w.shape
    if k % b:
        raise ValueError(f"{qtype}: {k} input features are not whole {b}-weight blocks")
    x = w.float().reshape(n, k // b, b)
    if qtype == "Q8_0":
        d = (x.abs().amax(-1) / 127).half()
        q = torch.round(x / _safe(d).unsqueeze(-1)).clamp(-128, 127).to(torch.int8).view(torch.uint8)
        return torch.cat([_bytes(d), q], -1)
    if qtype in ("Q4_0", "Q4_1"):
        if qtype == "Q4_0":
            d = (x.abs().amax(-1) / 8).half()
            q = (torch.round(x / _safe(d).unsqueeze(-1)) + 8).clamp(0, 15)
            head = [_bytes(d)]
        else:
            lo, hi = x.amin(-1), x.amax(-1)
            d, m = ((hi - lo) / 15).half(), lo.half()
            q = torch.round((x - m.float().unsqueeze(-1)) / _safe(d).unsqueeze(-1)).clamp(0, 15)
            head = [_bytes(d), _bytes(m)]
        q = q.to(torch.uint8)
        return torch.cat(head + [q[..., :16] | (q[..., 16:] << 4)], -1)
    if qtype in ("Q4_K", "Q5_K"):
        maxq = 15 if qtype == "Q4_K" else 31
        sub = x.reshape(n, k // b, 8, 32)
        lo = sub.amin(-1).clamp(max=0)
        scale, mins = (sub.amax(-1) - lo) / maxq, -lo
        d, dmin = (scale.amax(-1) / 63).half(), (mins.amax(-1) / 63).half()
        sc = torch.round(scale / _safe(d).unsqueeze(-1)).clamp(0, 63).to(torch.uint8)
        mn = torch.round(mins / _safe(dmin).unsqueeze(-1)).clamp(0, 63).to(torch.uint8)
        eff_s = d.float().unsqueeze(-1) * sc.float()
        eff_m = dmin.float().unsqueeze(-1) * mn.float()
        q = torch.round((sub + eff_m.unsqueeze(-1)) / _safe(eff_s).unsqueeze(-1)).clamp(0, maxq).to(torch.uint8)
        q = q.reshape(n, k // b, QK_K)
        scales = torch.cat([(sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6),
                            (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], -1)
        low = (q & 0x0F).reshape(n, k // b, 4, 2, 32)
        qs = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(n, k // b, 128)
        parts = [_bytes(d), _bytes(dmin), scales]
        if qtype == "Q5_K":
            high = (q >> 4).reshape(n, k // b, 8, 32)
            qh = sum((high[..., i, :] << i) for i in range(8)).to(torch.uint8)
            parts.append(qh)
        return torch.cat(parts + [qs], -1)
    # Q6_K
    sub = x.reshape(n, k // b, 16, 16)
    amax_idx = sub.abs().argmax(-1, keepdim=True)
    scale = torch.gather(sub, -1, amax_idx).squeeze(-1) / -32  # signed, as ggml: the extreme maps to -32
    d = (scale.abs().amax(-1) / 127).half()
    sc = torch.round(scale / _safe(d).unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    eff = d.float().unsqueeze(-1) * sc.float()
    q = (torch.round(sub / _safe(eff).unsqueeze(-1)) + 32).clamp(0, 63).to(torch.uint8).reshape(n, k // b, QK_K)
    low = (q & 0x0F).reshape(n, k // b, 2, 2, 64)
    ql = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(n, k // b, 128)
    high = (q >> 4).reshape(n, k // b, 2, 4, 32)
    qh = (high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6))
    return torch.cat([ql, qh.reshape(n, k // b, 64), sc.view(torch.uint8), _bytes(d)], -1)


def _safe(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return torch.where(t == 0, torch.ones_like(t), t)


def _bytes(h: torch.Tensor) -> torch.Tensor:
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)
