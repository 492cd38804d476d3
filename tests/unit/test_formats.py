"""The weight-format seam (parallel/formats): a format declares its tensors, the layers shard them.

A test-only format with a packed weight and group-wise scales (the shape
of int4 formats) checks that column- and row-parallel layers cut every
tensor at the right element for each rank, refuse a split through a group,
and that per-rank results add up to the unsplit layer's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetlm.kernels import select_ops
from fleetlm.parallel.context import ParallelContext
from fleetlm.parallel.formats import FORMATS, DenseMethod, LinearMethod, ParamSpec, linear_methods
from fleetlm.parallel.formats.base import register
from fleetlm.parallel.layers import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from fleetlm.workers.loader.lazy import LazyTensor

GROUP = 4
PACK = 2  # two values per stored element along the output features


class PackedGroupMethod(LinearMethod):
    """w[o, i] = (codes[o // 2, i] >> 4 * (o % 2) & 15) * scales[o, i // GROUP]."""

    name = "packed-group"

    def create_weights(self, layer, in_features, out_features, dtype, device):
        return [
            register(layer, ParamSpec("codes", (out_features // PACK, in_features), torch.int32, out_per=PACK), device),
            register(layer, ParamSpec("scales", (out_features, in_features // GROUP), torch.float32, in_per=GROUP),
                     device),
        ]

    def dequantize(self, layer):
        codes = layer.codes.data
        nibbles = torch.stack([codes & 15, (codes >> 4) & 15], dim=1).reshape(-1, codes.shape[1])
        return nibbles.float() * layer.scales.data.repeat_interleave(GROUP, dim=1)

    def apply(self, layer, x, bias):
        return F.linear(x, self.dequantize(layer), bias)


def lazy(t: torch.Tensor) -> LazyTensor:
    def read(rows, cols):
        block = t[rows] if rows is not None else t
        return block[:, cols] if cols is not None else block
    return LazyTensor(tuple(t.shape), t.dtype, torch.device("cpu"), read)


def checkpoint(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    nib = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    codes = nib[0::2] | (nib[1::2] << 4)
    scales = torch.rand(out_f, in_f // GROUP, generator=g)
    return {"codes": codes, "scales": scales}, nib.float() * scales.repeat_interleave(GROUP, dim=1)


def loaded(cls, tp, rank, out_f, in_f, tensors, method):
    layer = cls(in_f, out_f, False, ParallelContext(tp_rank=rank, tp_size=tp), torch.float32, "cpu", method)
    for name, t in tensors.items():
        layer.load(f"x.{name}", lazy(t))
    return layer


def test_column_parallel_cuts_packed_rows_and_their_scales():
    tensors, w = checkpoint(8, 16)
    x = torch.randn(3, 16)
    parts = [loaded(ColumnParallelLinear, 2, r, 8, 16, tensors, PackedGroupMethod())(x) for r in range(2)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), x @ w.T)


def test_row_parallel_cuts_whole_groups_and_all_reduces_to_the_unsplit_result():
    tensors, w = checkpoint(8, 16)
    x = torch.randn(3, 16)
    layers = [loaded(RowParallelLinear, 2, r, 8, 16, tensors, PackedGroupMethod()) for r in range(2)]
    # Each rank's partial product (the layer would all-reduce them; here the test adds them).
    parts = [layer.method.apply(layer, x[:, 8 * r:8 * r + 8], None) for r, layer in enumerate(layers)]
    torch.testing.assert_close(parts[0] + parts[1], x @ w.T)


def test_a_split_through_a_group_is_refused():
    tensors, _ = checkpoint(8, 24)  # 24 inputs, 3 groups of 4... and 4 ranks of 6: not whole groups
    layer = RowParallelLinear(24, 8, False, ParallelContext(tp_rank=1, tp_size=4), torch.float32, "cpu",
                              PackedGroupMethod())
    with pytest.raises(ValueError, match="whole groups"):
        layer.load("x.scales", lazy(tensors["scales"]))


def test_merged_shards_land_at_their_offset():
    t0, w0 = checkpoint(8, 8, seed=1)
    t1, w1 = checkpoint(8, 8, seed=2)
    layer = MergedColumnParallelLinear(8, [8, 8], False, ParallelContext(), torch.float32, "cpu", PackedGroupMethod())
    for shard, tensors in enumerate((t0, t1)):
        for name, t in tensors.items():
            layer.load_shard(shard, f"x.{name}", lazy(t))
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ torch.cat([w0, w1]).T)
    # No fused kernel in this format: silu_mul falls back to silu_and_mul of the matmul.
    ref = select_ops("cpu").silu_and_mul(x @ torch.cat([w0, w1]).T)
    torch.testing.assert_close(layer.silu_mul(x, select_ops("cpu").silu_and_mul), ref)


def test_unknown_tensor_and_unknown_format_are_clear_errors():
    layer = ColumnParallelLinear(4, 4, False, ParallelContext(), torch.float32, "cpu", DenseMethod(select_ops("cpu")))
    with pytest.raises(ValueError, match="a dense ColumnParallelLinear has no tensor 'qweight' .*holds weight"):
        layer.load("q_proj.qweight", lazy(torch.zeros(4, 4)))
    with pytest.raises(ValueError, match="unknown weight format 'int3'; known: dense"):
        linear_methods(select_ops("cpu"), "int3")
    assert set(FORMATS) == {"dense"}
