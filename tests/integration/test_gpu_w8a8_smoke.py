"""benchmarks/gpu_w8a8.py on CPU (--smoke: a tiny dummy model): every part runs and records figures.

The GPU run is the lead's (one device call); this keeps the script from
breaking between those calls.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_every_part_runs_and_is_recorded(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_w8a8.py"
    spec = importlib.util.spec_from_file_location("gpu_w8a8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--budget", "600"]) == 0
    record = json.loads(next(tmp_path.glob("gpu-quant-*.json")).read_text())
    assert record["commit"] and record["card"] and record["date"]
    parts = record["parts"]
    assert set(parts) == {"ceilings", "kernels", "8b", "70b"}
    assert parts["ceilings"]["fp8_matmul_tflops"] > 0 and parts["ceilings"]["int8_matmul_tops"] > 0
    for fmt in ("bf16", "fp8", "int8"):
        runs = parts["8b"][fmt]
        assert "error" not in runs, runs
        assert runs["latency"]["complete"] and runs["latency"]["roofline_tokens_per_s"] > 0
        assert runs["offline_1024"]["complete"] and runs["offline_512"]["output_tokens_per_s"] > 0
    # 8-bit linear weights: a decode step reads less than bf16's (the LM head and norms stay 16-bit).
    assert parts["8b"]["fp8"]["decode_weight_bytes"] < parts["8b"]["bf16"]["decode_weight_bytes"]
    assert parts["70b"]["fp8"]["offline_256x512"]["complete"]
    assert any("fp8 latency" in row["what"] and row["ratio"].endswith("x bf16") for row in record["table"])
