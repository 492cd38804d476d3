"""Rounding float32 to FP8 E4M3 inside Triton kernels, shared by the KV-cache store and activation quantization.

``round_to_e4m3(x)`` maps float32 ``x`` with ``|x| <= 448`` (callers clamp
first: past 448 the ``fn`` format has no infinity, the cast would give NaN)
to the nearest E4M3 value, ties to even, still as float32. The kernel then
stores it into a float8 pointer (``x.to(ptr.dtype.element_ty)``): the cast
of an exact E4M3 value is exact on every backend. Rounding here rather than
by the cast because the CPU interpreter of triton 3.9 rounds float32 -> fp8
casts itself, wrongly (no carry into the exponent, ties away from zero), and
because a helper that returns float8 from one constexpr branch and int8 from
another does not compile (Triton 3.6: "Return type mismatch").

A few integer ops per element; the kernels that call it are memory bound.
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
