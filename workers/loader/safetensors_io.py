"""Safetensors read with parallel I/O straight into the tensors that keep them (no host copy of the model).

A safetensors file is an 8-byte little-endian header length, a JSON header
(per tensor: dtype, shape, ``data_offsets`` into the data section), then the
raw row-major bytes. A block of whole rows of a tensor is therefore one
contiguous byte range: :func:`read_rows` splits it into ``CHUNK_BYTES``
pieces read concurrently with ``os.preadv`` (which releases the GIL, so the
reads overlap on an NVMe queue) into a pinned staging buffer, and copies
each piece to the device as it lands. Host memory in use is the staging
buffer (at most ``STAGING_BYTES``), never the model. On a CPU device the
pieces are read straight into the result tensor.

What each call moves: ``(rows.stop - rows.start) * row_bytes`` from the file
(page cache or disk), the same over PCIe on a GPU. A block of columns is
strided in the file; those reads stay with safetensors' memory-mapped slices
(``hf_weights.py``), which touch only the pages that hold them.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

# Reads in flight per file: enough to fill an NVMe queue, few enough for a shared host.
IO_THREADS = 8
CHUNK_BYTES = 16 << 20
STAGING_BYTES = IO_THREADS * CHUNK_BYTES

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // self.shape[0] if self.shape and self.shape[0] else self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, with absolute byte ranges."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {spec['dtype']}")
        begin, end = spec["data_offsets"]
        out[name] = TensorEntry(DTYPES[spec["dtype"]], tuple(spec["shape"]), base + begin, base + end)
    return out


class ParallelReader:
    """Reads whole-row blocks of the tensors of safetensors files onto one device (one per loader)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes_read = 0
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="fleetlm-io")
        self._staging: torch.Tensor | None = None
        self._lock = threading.Lock()  # one block at a time uses the staging buffer

    def read_rows(self, path: str | Path, entry: TensorEntry, rows: slice | None) -> torch.Tensor:
        """``tensor[rows]`` (all of it for None), in the stored dtype, on the device."""
        if not entry.shape:  # a scalar
            shape, start, nbytes = (), entry.start, entry.end - entry.start
        else:
            lo, hi = (0, entry.shape[0]) if rows is None else (rows.start, rows.stop)
            shape, start, nbytes = (hi - lo, *entry.shape[1:]), entry.start + lo * entry.row_bytes, (hi - lo) * entry.row_bytes
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                if self.device.type == "cuda":
                    self._to_device(fd, start, out)
                else:
                    self._gather(fd, start, [(out, 0, nbytes)])
            finally:
                os.close(fd)
        self.bytes_read += nbytes
        return out.view(entry.dtype).reshape(shape)

    def _gather(self, fd: int, start: int, pieces: list[tuple[torch.Tensor, int, int]]) -> None:
        """Read ``(buffer, offset in the range, length)`` pieces concurrently, each in chunks."""
        jobs = []
        for buf, off, length in pieces:
            view = memoryview(buf.numpy())
            for c in range(0, length, CHUNK_BYTES):
                n = min(CHUNK_BYTES, length - c)
                jobs.append(self._pool.submit(_pread_exactly, fd, view[c:c + n], start + off + c))
        for j in jobs:
            j.result()

    def _to_device(self, fd: int, start: int, out: torch.Tensor) -> None:
        with self._lock:
            if self._staging is None:
                self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            staging = self._staging
            for off in range(0, out.numel(), STAGING_BYTES):
                n = min(STAGING_BYTES, out.numel() - off)
                torch.cuda.current_stream(self.device).synchronize()  # the last copy out of staging is done
                self._gather(fd, start + off, [(staging[:n], 0, n)])
                out[off:off + n].copy_(staging[:n], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._staging = None


def _pread_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


__all__ = ["ParallelReader", "TensorEntry", "read_header"]
