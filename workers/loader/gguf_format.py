"""A fast reader for the GGUF container: metadata, tensor directory, raw bytes.

Why not `gguf.GGUFReader`: it builds a numpy view per array element, which
costs about 3.5 s on the embedded model's 49k-token vocabulary (and is paid on
every `resolve_model`). This reader walks the same header with `struct` over
one bytes buffer (tens of milliseconds) and memory-maps the tensor data, so
weights are read lazily, row by row. Dequantization itself is left to
`gguf.quants`.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor
count, u64 metadata count; metadata as (string key, u32 type, value); tensor
infos as (string name, u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml
type, u64 offset); padding to `general.alignment` (default 32); tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")
_HEADER_PROBE_BYTES = 8 << 20  # enough for a 128k-token vocabulary

# struct format and numpy dtype of each fixed-size metadata value type.
_SCALARS: dict[GGUFValueType, tuple[str, np.dtype]] = {
    GGUFValueType.UINT8: ("<B", np.dtype("<u1")),
    GGUFValueType.INT8: ("<b", np.dtype("<i1")),
    GGUFValueType.UINT16: ("<H", np.dtype("<u2")),
    GGUFValueType.INT16: ("<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ("<I", np.dtype("<u4")),
    GGUFValueType.INT32: ("<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ("<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ("<?", np.dtype("?")),
    GGUFValueType.UINT64: ("<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ("<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ("<d", np.dtype("<f8")),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's directory entry. `shape` is numpy/HF order (outermost
    first), i.e. GGUF's `ne` dims reversed: a linear layer is [out, in]."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (last dim); quant blocks never cross rows."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block_size * type_size

    @property
    def num_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data. Arrays of numbers are numpy arrays,
    arrays of strings are lists of str, scalars are Python values."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data_offset: int  # first byte of tensor data (= header length)


class _Cursor:
    """Sequential little-endian decoding over a prefix of the file."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise _NeedMoreBytes
        text = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def _strings(self, count: int) -> list[str]:
        """The vocabulary's hot loop (~100k strings): locals only."""
        buf, pos, unpack, out = self.buf, self.pos, _U64.unpack_from, []
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(buf[pos : pos + n].decode("utf-8"))
            pos += n
        if pos > len(buf):
            raise _NeedMoreBytes
        self.pos = pos
        return out

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item_type in _SCALARS:
                dtype = _SCALARS[item_type][1]
                if self.pos + count * dtype.itemsize > len(self.buf):
                    raise _NeedMoreBytes
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.copy()
            if item_type == GGUFValueType.STRING:
                return self._strings(count)
            return [self.value(item_type) for _ in range(count)]
        return self.scalar(_SCALARS[vtype][0])


class _NeedMoreBytes(Exception):
    """The probe ended inside the header: read a larger one."""


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse metadata and the tensor directory of a GGUF file.

    Reads a prefix of the file into bytes (3x faster to slice than an mmap)
    and retries with a larger prefix if the header does not fit.
    """
    path = Path(path)
    size = path.stat().st_size
    probe = _HEADER_PROBE_BYTES
    while True:
        with open(path, "rb") as f:
            buf = f.read(min(probe, size))
        try:
            return _parse(path, buf)
        except (_NeedMoreBytes, struct.error):
            if probe >= size:
                raise ValueError(f"{path}: truncated GGUF header") from None
            probe *= 4
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: malformed GGUF header ({e})") from e


def _parse(path: Path, buf: bytes) -> GGUFHeader:
    cur = _Cursor(buf)
    if buf[:4] != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {buf[:4]!r})")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (need 2 or 3, little-endian)")
    num_tensors = cur.scalar("<Q")
    num_kv = cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(GGUFValueType(cur.scalar("<I")))
    infos = []
    for _ in range(num_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        ne = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += 8 * n_dims
        qtype = GGMLQuantizationType(cur.scalar("<I"))
        rel_offset = cur.scalar("<Q")
        infos.append((name, tuple(int(d) for d in reversed(ne)), qtype, rel_offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = {
        name: GGUFTensorInfo(name, shape, qtype, data_offset + rel)
        for name, shape, qtype, rel in infos
    }
    return GGUFHeader(path, version, metadata, tensors, data_offset)


def map_file(path: str | Path) -> np.ndarray:
    """The whole file as a read-only uint8 array over an mmap (nothing read
    yet). A plain ndarray, not np.memmap: every array derived from a memmap
    pays a Python-level __array_finalize__, 15% of dequantization time."""
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def tensor_bytes(file_map: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor's raw bytes as a [num_rows, row_bytes] view of the map;
    indexing rows of it touches only those rows' pages."""
    nbytes = info.num_rows * info.row_bytes
    if info.offset + nbytes > file_map.size:
        raise ValueError(f"GGUF tensor {info.name}: the file is truncated ({info.qtype.name} {list(info.shape)} needs "
                         f"{nbytes} bytes at offset {info.offset}, the file has {file_map.size})")
    return file_map[info.offset : info.offset + nbytes].reshape(info.num_rows, info.row_bytes)
