"""Weights of an HF model directory (*.safetensors), read lazily by slice.

`safe_open(...).get_slice(name)[rows, cols]` reads only the requested block
from the memory-mapped file, so a tensor-parallel rank pays for its shard
only. PyTorch `.bin` checkpoints are not supported (pickle, no slicing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from fleetlm.workers.loader.lazy import LazyTensor

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
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        for name, shape in shapes.items():
            yield name, LazyTensor(shape, dtype, device, _SafetensorsReader(path, name))


class _SafetensorsReader:
    """Reads [rows, cols] of one stored tensor; opens the file per read so a
    LazyTensor stays valid after iteration without holding file handles."""

    def __init__(self, path: Path, name: str):
        self.path = path
        self.name = name

    def __call__(self, rows: slice | None, cols: slice | None) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            if rows is None:
                return f.get_tensor(self.name)
            block = f.get_slice(self.name)
            if cols is None:
                return block[rows]
            return block[rows, cols]
