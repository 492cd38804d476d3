"""The parallel safetensors reader: the bytes safetensors itself reads, whole or by rows, in every dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fleetlm.workers.loader import safetensors_io
from fleetlm.workers.loader.safetensors_io import ParallelReader, read_header


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(37, 53, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(11, 7, generator=g),
        "w.f16": torch.randn(5, 3, 2, generator=g).half(),
        "b.1d": torch.randn(29, generator=g),
        "scale": torch.tensor(0.25),
        "ids": torch.arange(10, dtype=torch.int64),
        "fp8": torch.randn(9, 16, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


@pytest.mark.parametrize("chunk", [7, 1 << 20])  # many small chunks read concurrently, or one
def test_reads_match_safetensors_whole_and_by_rows(checkpoint, monkeypatch, chunk):
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", chunk)
    path, tensors = checkpoint
    entries = read_header(path)
    assert set(entries) == set(tensors)
    reader = ParallelReader(torch.device("cpu"))
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, t in tensors.items():
                got = reader.read_rows(path, entries[name], None)
                assert got.dtype == t.dtype and got.shape == t.shape
                assert torch.equal(_bytes(got), _bytes(f.get_tensor(name))), name
                if t.dim() >= 1 and t.shape[0] > 2:
                    part = reader.read_rows(path, entries[name], slice(1, t.shape[0] - 1))
                    assert torch.equal(_bytes(part), _bytes(t[1:-1])), name
    finally:
        reader.close()
    assert reader.bytes_read > 0


def test_an_unknown_dtype_is_refused_naming_the_tensor(tmp_path):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ValueError, match="'x'.*F4"):
        read_header(path)
