"""The compile cache's directory is keyed by software and device: another version's is never read."""

from __future__ import annotations

import os

import torch

from fleetlm.workers import compile_cache
from fleetlm.workers.compile_cache import cache_key, use_compile_cache


def test_a_start_points_triton_at_its_key_and_counts_what_is_there(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cpu = torch.device("cpu")
    first = use_compile_cache(str(tmp_path), cpu)
    assert first.entries_at_start == 0 and first.key == cache_key(cpu)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / first.key / "triton")
    (tmp_path / first.key / "triton" / "kernel-abc").mkdir()  # what a compile leaves
    second = use_compile_cache(str(tmp_path), cpu)
    assert second.entries_at_start == 1 and second.dir == first.dir
    assert (first.dir / "manifest.json").is_file()


def test_another_version_has_another_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cpu = torch.device("cpu")
    mine = use_compile_cache(str(tmp_path), cpu)
    (mine.dir / "triton" / "kernel-abc").mkdir()
    monkeypatch.setattr(compile_cache.torch, "__version__", "9.9.9")
    other = use_compile_cache(str(tmp_path), cpu)
    assert other.key != mine.key and "9.9.9" in other.key
    assert other.entries_at_start == 0  # the old version's kernels are not seen
    assert "/" not in other.key and " " not in other.key
