"""The wq_linear config table: lookup (exact, nearest, defaults), validation, and the sweep's output format."""

import importlib.util
import json
from pathlib import Path

import pytest

from fleetlm.kernels import wq_configs
from fleetlm.kernels.wq_configs import WQConfig, default_config, kind_of, load_table, lookup, m_bucket

ROOT = Path(__file__).resolve().parents[2]


def _sweep():
    spec = importlib.util.spec_from_file_location("gpu_wq_sweep", ROOT / "benchmarks" / "gpu_wq_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_buckets_and_kinds():
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 64, 65, 1024, 5000)] == [1, 2, 4, 16, 32, 64, 128, 1024, 1024]
    assert kind_of(4, 128, False, False, False) == "w4g128"
    assert kind_of(4, 32, True, True, False) == "w4g32km"  # Q4_K
    assert kind_of(8, 16, True, False, False) == "w8g16k"  # Q6_K
    assert kind_of(4, 64, False, False, True) == "w4g64a"  # GPTQ act-order


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="path 'fast'"):
        WQConfig("fast")
    with pytest.raises(ValueError, match="block_n=48 must be a positive power of two"):
        WQConfig("gemv", block_n=48)
    with pytest.raises(ValueError, match=r"keys \['tile'\] are unknown"):
        WQConfig.from_dict({"path": "mm", "tile": 3})
    assert WQConfig.from_dict(WQConfig("mm", swap_ab=True).to_dict()) == WQConfig("mm", swap_ab=True)


def test_defaults_by_rows():
    assert default_config("w4g128", 1, 4096, 4096).path == "gemv"
    skinny = default_config("w4g128", 16, 4096, 4096)
    assert skinny.path == "mm" and skinny.swap_ab and skinny.block_m == 16
    assert default_config("w4g128", 64, 4096, 4096).block_m == 64
    assert default_config("w4g32km", 4096, 4096, 4096).path == "dequant"
    # K splits until ~2 programs per SM, never below 4 loop steps per split
    gemv = default_config("w4g128", 1, 4096, 4096)
    assert -(-4096 // gemv.block_n) * gemv.split_k >= 2 * wq_configs.SMS
    assert default_config("w4g128", 1, 4096, 256).split_k == 1


def test_lookup_exact_then_nearest_then_default(tmp_path):
    fast = WQConfig("gemv", block_n=128, block_kw=8, num_warps=1, split_k=8)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"entries": [{"kind": "w4g128", "m": 1, "n": 4096, "k": 4096, "config": fast.to_dict()}]}))
    table = load_table(path)
    assert lookup("w4g128", 1, 4096, 4096, table) == fast
    assert lookup("w4g128", 1, 6144, 4096, table) == fast  # within 4x in N and K: the nearest entry
    assert lookup("w4g128", 1, 4096, 65536, table) == default_config("w4g128", 1, 4096, 65536)  # too far
    assert lookup("w4g128", 16, 4096, 4096, table) == default_config("w4g128", 16, 4096, 4096)  # other bucket
    assert lookup("w4g32km", 1, 4096, 4096, table) == default_config("w4g32km", 1, 4096, 4096)  # other kind
    path.write_text(json.dumps({"entries": [{"kind": "w4g128", "m": 3, "n": 1, "k": 1, "config": fast.to_dict()}]}))
    with pytest.raises(ValueError, match="m bucket 3"):
        load_table(path)


def test_the_sweeps_table_is_what_the_kernels_read(tmp_path):
    sweep = _sweep()
    jobs = sweep._jobs()
    assert 300 <= len(jobs) <= 800  # a few hundred timed launches: the sweep fits one 4-minute GPU call
    for job in jobs:
        WQConfig.from_dict(job["cfg"])  # every candidate is a valid config
    results = [dict(job, ok=True, us=10.0 + i % 7, bytes=1) for i, job in enumerate(jobs)]
    best, entries = sweep.best_entries(results)
    path = tmp_path / "wq_configs.json"
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    table = load_table(path)
    for (kind, m, shape), r in best.items():
        n, k = sweep.SHAPES[shape]
        qkind = kind_of(4, 128, False, False, False) if kind == "int4" else kind_of(4, 32, True, True, False)
        for bucket in sweep.M_RUNS[m]:
            assert lookup(qkind, bucket, n, k, table) == WQConfig.from_dict(r["cfg"])


def test_committed_table_loads():
    if wq_configs.TABLE_PATH.exists():  # absent until the first sweep's table is committed
        table = load_table()
        assert table and all(e.config.path in wq_configs.PATHS for v in table.values() for e in v)


def test_use_table_swaps_what_lookup_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(wq_configs, "TABLE", wq_configs.TABLE)  # restored after the test
    fast = WQConfig("gemv", block_n=64, block_kw=8, num_warps=2)
    path = tmp_path / "swept.json"
    path.write_text(json.dumps({"entries": [{"kind": "w4g128", "m": 1, "n": 512, "k": 512, "config": fast.to_dict()}]}))
    assert lookup("w4g128", 1, 512, 512) == default_config("w4g128", 1, 512, 512)
    wq_configs.use_table(path)
    assert lookup("w4g128", 1, 512, 512) == fast
    with pytest.raises(FileNotFoundError, match="missing.json"):
        wq_configs.use_table(tmp_path / "missing.json")
