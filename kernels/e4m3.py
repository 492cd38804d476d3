"""FP8 E4M3 inside Triton kernels: two helpers, shared by the KV-cache store and activation quantization.

``round_to_e4m3(x)`` maps float32 ``x`` with ``|x| <= 448`` (callers clamp
first: past 448 the ``fn`` format has no infinity, the cast would give NaN)
to the nearest E4M3 value, ties to even, still as float32. The kernel then
stores it into a float8 pointer (``x.to(ptr.dtype.element_ty)``): the cast
of an exact E4M3 value is exact on every backend. Rounding here rather than
by the cast because the CPU interpreter of triton 3.9 rounds float32 -> fp8
casts itself, wrongly (no carry into the exponent, ties away from zero), and
because a helper that returns float8 from one constexpr branch and int8 from
another does not compile (Triton 3.6: "Return type mismatch"). Activation
quantization (``kernels/quant.py``) uses it.

``e4m3_byte(x)`` gives the E4M3 byte itself (int32 in 0..255), saturating at
+-448, by integer steps on the float32 bits, with no float -> fp8 conversion
at all: the KV-cache store (``kernels/kv_cache.py``) writes those bytes, and
its torch reference ``encode_e4m3`` takes the same steps, so the cache's bits
are the same on the GPU, under the interpreter and in torch (a first H100 run
saw the GPU's conversion differ from torch's while the interpreter agreed).

A few integer ops per element; the kernels that call them are memory bound.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: nothing here is needed.
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def round_to_e4m3(x):
        """float32 in [-448, 448] -> the nearest E4M3 value (ties to even), still float32."""
        raw = x.to(tl.int32, bitcast=True)
        # Normals: keep 3 mantissa bits of 23, rounding to nearest even; a carry bumps the exponent.
        bits = (raw + 0x7FFFF + ((raw >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000 as int32
        normal = bits.to(tl.float32, bitcast=True)
        # Below 2^-6, E4M3's subnormals are multiples of 2^-9: adding 2^14 (ulp 2^-9) rounds to one, ties to even.
        a = tl.abs(x)
        sub = (a + 16384.0) - 16384.0
        sub = tl.where(raw < 0, -sub, sub)  # the sign bit, so -0.0 (and what rounds to zero) stays negative
        return tl.where(a < 0.015625, sub, normal)

    @triton.jit
    def e4m3_byte(x):
        """float32 -> its E4M3 byte (int32 in 0..255): saturated at +-448, rounded to nearest even.

        Integer steps only (``kernels/kv_cache.encode_e4m3`` is the same in torch); NaN -> 0x7F/0xFF.
        """
        bits = x.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = tl.minimum(bits & 0x7FFFFFFF, 0x43E00000)  # |x| saturated at 448 (0x43E00000)
        # Normals (|x| >= 2^-6): keep 3 of 23 mantissa bits, ties to even; a carry bumps the exponent.
        r = a + 0x7FFFF + ((a >> 20) & 1)
        normal = (r >> 20) - 960  # (exponent << 3 | mantissa) rebiased from 127 to 7
        # Subnormals (|x| < 2^-6): the multiple of 2^-9, i.e. the 24-bit significand >> (14 - e), ties to even.
        e = (a >> 23) - 127
        sig = (a & 0x7FFFFF) | 0x800000
        shift = tl.minimum(14 - e, 25)  # >= 21 here; 25 already sends every significand to 0
        q = sig >> shift
        rem = sig - (q << shift)
        half = 1 << (shift - 1)
        q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        mag = tl.where(a >= 0x3C800000, normal, q)  # 0x3C800000 == 2^-6
        mag = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7F, mag)  # NaN stays NaN
        return sign | mag
