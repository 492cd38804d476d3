"""LazyTensor: a weight whose shape is known but whose bytes are not read yet.

Why: a tensor-parallel rank needs only its shard of each weight (a block of
rows for column-parallel layers, of columns for row-parallel ones). Loading
through `load(rows=..., cols=...)` lets each source read just that block:
safetensors through `get_slice`, GGUF by dequantizing only the selected rows,
dummy weights by generating only the row chunks that cover the slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# A source's reader: (rows, cols) -> the block, in any dtype, on any device.
# `rows` is a normalized slice (start, stop, step 1) of dim 0 (None for a 0-D
# tensor); `cols` is a normalized slice of dim 1, or None for all columns.
Reader = Callable[["slice | None", "slice | None"], torch.Tensor]


@dataclass(frozen=True, eq=False)  # equal only to itself: two weights may share a shape
class LazyTensor:
    """A named weight of `shape`; `load()` returns it (or a row/column block of
    it) as a contiguous tensor of `dtype` on `device`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    read: Reader = field(repr=False)

    def load(self, rows: slice | None = None, cols: slice | None = None,
             dtype: torch.dtype | None = ...) -> torch.Tensor:  # type: ignore[assignment]
        """Read `self[rows, cols]`. Slices must be contiguous (step 1); `cols`
        needs a 2-D tensor. Only the requested block is read where the source
        allows it. `dtype`: the result's (default: this tensor's `dtype`;
        None: as the source stores it, for quantized tensors)."""
        if dtype is ...:
            dtype = self.dtype
        if not self.shape:  # a scalar (e.g. a quantization scale)
            if rows is not None or cols is not None:
                raise ValueError("a 0-D tensor cannot be sliced")
            return self.read(None, None).to(device=self.device, dtype=dtype)
        row_slice = _normalize(rows, self.shape[0], "rows")
        col_slice = None
        if cols is not None:
            if len(self.shape) < 2:
                raise ValueError(f"cols= needs a 2-D (or higher) tensor, this one has shape {self.shape}")
            col_slice = _normalize(cols, self.shape[1], "cols")
        out = self.read(row_slice, col_slice)
        expected = (row_slice.stop - row_slice.start,) + (
            (col_slice.stop - col_slice.start, *self.shape[2:]) if col_slice is not None else tuple(self.shape[1:])
        )
        if tuple(out.shape) != expected:
            raise RuntimeError(f"reader returned shape {tuple(out.shape)}, expected {expected}")
        return out.to(device=self.device, dtype=dtype).contiguous()


def _normalize(s: slice | None, size: int, what: str) -> slice:
    if s is None:
        return slice(0, size, 1)
    if not isinstance(s, slice):
        raise TypeError(f"{what}= must be a slice or None, got {type(s).__name__}")
    start, stop, step = s.indices(size)
    if step != 1:
        raise ValueError(f"{what}= must be contiguous (step 1), got step {step}")
    return slice(start, max(start, stop), 1)
