"""The device's ceilings, measured in the process before the engine takes its memory.

``matmul_tflops``: a square ``n^3`` matmul in the model's dtype (8192 on GPU,
1024 on CPU; ``2 n^3`` FLOPs each). ``copy_gbps``: a device-to-device copy of
1 GiB on GPU / 64 MiB on CPU, counting the bytes read plus the bytes written.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_repeated(fn: Callable[[], object], device: str, min_seconds: float, max_iters: int = 1000) -> tuple[float, int]:
    """(seconds per call, calls timed): warm up, then repeat for about ``min_seconds``."""
    for _ in range(2):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(3, min_seconds / once)))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters, iters


def measure_matmul_flops(device: str, dtype: str = "bfloat16", n: int | None = None, min_seconds: float = 1.0) -> dict[str, Any]:
    """FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (2 n^3 FLOPs per call)."""
    import torch

    n = n or (8192 if device == "cuda" else 1024)
    dt = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dt)
    seconds, iters = _time_repeated(lambda: torch.matmul(a, b, out=c), device, min_seconds)
    return {"matmul_size": n, "matmul_dtype": dtype, "matmul_iters": iters, "matmul_tflops": 2 * n**3 / seconds / 1e12}


def measure_copy_bandwidth(device: str, nbytes: int | None = None, min_seconds: float = 1.0) -> dict[str, Any]:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    import torch

    nbytes = nbytes or ((1 << 30) if device == "cuda" else (64 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, iters = _time_repeated(lambda: dst.copy_(src), device, min_seconds)
    return {"copy_bytes": nbytes, "copy_iters": iters, "copy_gbps": 2 * nbytes / seconds / 1e9}


def measure_ceilings(device: str, dtype: str = "bfloat16", matmul_size: int | None = None,
                     copy_bytes: int | None = None, min_seconds: float = 1.0) -> dict[str, Any]:
    """Matmul TFLOP/s and copy GB/s of this device, measured now (then the memory is given back)."""
    out = {"device": device}
    out.update(measure_copy_bandwidth(device, copy_bytes, min_seconds))
    out.update(measure_matmul_flops(device, dtype, matmul_size, min_seconds))
    free_device_memory(device)
    return out


def free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


__all__ = ["free_device_memory", "measure_ceilings", "measure_copy_bandwidth", "measure_matmul_flops"]
