"""Weights of an HF model directory (*.safetensors), read lazily by slice.

A block of whole rows (a whole tensor, or a column-parallel shard) is one
byte range of the file: ``safetensors_io.ParallelReader`` reads it with
parallel I/O straight into the device tensor that keeps it (through a small
pinned staging buffer on a GPU), never a host copy of the model. A block of
columns (a row-parallel shard) is strided in the file:
`safe_open(...).get_slice(name)[rows, cols]` reads it from the memory-mapped
file, touching only the pages that hold it. Either way a tensor-parallel rank
pays for its shard only. PyTorch `.bin` checkpoints are not supported
(pickle, no slicing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from fleetlm.workers.loader.lazy import LazyTensor
from fleetlm.workers.loader.safetensors_io import ParallelReader, TensorEntry, read_header

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: those named by the shard index if there is one,
    else model.safetensors, else every *.safetensors (some repos also ship a
    `consolidated.safetensors` with other names: the index rules it out)."""
    index = model_dir / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / _SINGLE).is_file():
        return [model_dir / _SINGLE]
    return sorted(model_dir.glob("*.safetensors"))


def iter_hf_weights(model_dir: Path, *, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, LazyTensor]]:
    """(name as stored, LazyTensor) for every tensor of every checkpoint file."""
    io = ParallelReader(device)
    for path in safetensors_files(model_dir):
        for name, entry in read_header(path).items():
            yield name, LazyTensor(entry.shape, dtype, device, _SafetensorsReader(path, name, entry, io))


class _SafetensorsReader:
    """Reads [rows, cols] of one stored tensor; opens the file per read so a
    LazyTensor stays valid after iteration without holding file handles."""

    def __init__(self, path: Path, name: str, entry: TensorEntry, io: ParallelReader):
        self.path = path
        self.name = name
        self.entry = entry
        self.io = io

    def __call__(self, rows: slice | None, cols: slice | None) -> torch.Tensor:
        if cols is None:
            return self.io.read_rows(self.path, self.entry, rows)
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(self.name)[rows, cols]
