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


def test_a_finished_warmup_marks_the_cache_warm_for_its_settings_only(tmp_path, monkeypatch):
    """The marker a warm-up leaves is what the next start's breakdown reads (compile_cache.warm)."""
    import dataclasses

    from fleetlm.engine.args import EngineArgs
    from fleetlm.workers.compile_cache import settings_fingerprint

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cpu = torch.device("cpu")
    config = EngineArgs(model="smollm2-135m-instruct", device="cpu").create_engine_config()
    fp = settings_fingerprint(config)
    # What is compiled depends on the step's budgets, not on names or memory budgets.
    other_budget = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_num_seqs=7))
    assert settings_fingerprint(other_budget) != fp
    renamed = dataclasses.replace(config, model=dataclasses.replace(config.model, served_name="x"),
                                  cache=dataclasses.replace(config.cache, cpu_kv_cache_bytes=1 << 20), max_logprobs=3)
    assert settings_fingerprint(renamed) == fp

    first = use_compile_cache(str(tmp_path), cpu, fp)
    assert not first.warm and first.to_dict()["warm"] is False
    first.mark_warm(1.5)
    again = use_compile_cache(str(tmp_path), cpu, fp)
    assert again.warm and again.to_dict()["fingerprint"] == fp
    assert not use_compile_cache(str(tmp_path), cpu, settings_fingerprint(other_budget)).warm
    monkeypatch.setattr(compile_cache.torch, "__version__", "9.9.9")
    assert not use_compile_cache(str(tmp_path), cpu, fp).warm  # another version: another directory
