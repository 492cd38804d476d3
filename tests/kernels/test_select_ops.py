"""select_ops: one backend chosen once, a frozen namespace of same-signature callables."""

import dataclasses

import pytest
import torch

from fleetlm.kernels import HAS_TRITON, Ops, select_ops
from fleetlm.kernels import activation, attention, kv_cache, rmsnorm, rotary

OP_NAMES = [f.name for f in dataclasses.fields(Ops) if f.name != "backend"]


def test_cpu_gets_torch_references():
    ops = select_ops(torch.device("cpu"))
    assert ops.backend == "torch"
    assert ops.rms_norm is rmsnorm.rms_norm_ref
    assert ops.fused_add_rms_norm is rmsnorm.fused_add_rms_norm_ref
    assert ops.rotary_embedding is rotary.rotary_embedding_ref
    assert ops.silu_and_mul is activation.silu_and_mul_ref
    assert ops.store_kv_cache is kv_cache.store_kv_cache_ref
    assert ops.paged_attention is attention.paged_attention_ref
    assert select_ops("cpu", use_triton=False) == ops


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_use_triton_forces_the_launchers():
    ops = select_ops("cpu", use_triton=True)
    assert ops.backend == "triton"
    assert ops.paged_attention is attention.paged_attention
    assert ops.store_kv_cache is kv_cache.store_kv_cache
    for name in OP_NAMES:  # the same function names minus "_ref"
        assert getattr(ops, name).__name__ + "_ref" == getattr(select_ops("cpu"), name).__name__


@pytest.mark.skipif(HAS_TRITON, reason="triton is importable")
def test_use_triton_without_triton_raises():
    with pytest.raises(RuntimeError, match="triton"):
        select_ops("cpu", use_triton=True)


def test_ops_is_frozen():
    ops = select_ops("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.rms_norm = rmsnorm.rms_norm
