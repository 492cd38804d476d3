"""The parallel safetensors reader onto a GPU (through pinned staging): the bytes safetensors reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fleetlm.workers.loader import safetensors_io
from fleetlm.workers.loader.safetensors_io import ParallelReader, read_header

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("staging_bytes", [1 << 10, 64 << 20])  # many staging rounds, or one
def test_rows_land_on_the_gpu_bit_exact(tmp_path, monkeypatch, staging_bytes):
    monkeypatch.setattr(safetensors_io, "STAGING_BYTES", staging_bytes)
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", max(1, staging_bytes // safetensors_io.IO_THREADS))
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(1031, 517, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
               "s": torch.tensor(2.0)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    ref = load_file(str(path))
    entries = read_header(path)
    reader = ParallelReader(torch.device("cuda:0"))
    try:
        for name, t in ref.items():
            got = reader.read_rows(path, entries[name], None)
            assert got.is_cuda and torch.equal(got.cpu(), t), name
        part = reader.read_rows(path, entries["a"], slice(100, 900))
        assert torch.equal(part.cpu(), ref["a"][100:900])
    finally:
        reader.close()
