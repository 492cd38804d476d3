"""AWQ checkpoints (``quantization_config.quant_method == "awq"``, GEMM version), kept quantized.

Config keys read (HF's names, and AutoAWQ's ``w_bit`` / ``q_group_size``):
``bits`` (4), ``group_size`` (a positive multiple of 8), ``zero_point``
(true), ``version`` ("gemm"; the GEMV and Marlin versions pack differently
and are refused), ``modules_to_not_convert`` (those layers stay float).
Tensors per layer: ``qweight [K, N / 8]`` and ``qzeros [groups, N / 8]`` in
AWQ's field order, ``scales [groups, N]`` float16 (``packing.py``).

Tensor parallelism: column-parallel layers cut N in whole words (N per
rank a multiple of 8), row-parallel layers cut K in whole groups.
"""

from __future__ import annotations

from typing import Any

import torch

from fleetlm.kernels.wq_linear import QuantWeight
from fleetlm.parallel.formats.base import ParamSpec
from fleetlm.parallel.formats.dense import DenseMethod
from fleetlm.parallel.formats.gptq import _with_skips
from fleetlm.parallel.formats.grouped import GroupQuantMethod
from fleetlm.parallel.formats.packing import awq_order, pack, unpack
from fleetlm.parallel.formats.registry import Quantization, register_quantization

BITS = 4
VERSIONS = ("gemm",)


class AWQMethod(GroupQuantMethod):
    name = "awq"

    def checkpoint_specs(self, layer, in_features, out_features) -> list[ParamSpec]:
        if out_features % 8:
            raise ValueError(f"awq: {out_features} output features per rank do not fill whole 8-column words")
        g = self.group
        return [
            ParamSpec("qweight", (in_features, out_features // 8), torch.int32, out_dim=1, in_dim=0, out_per=8),
            ParamSpec("qzeros", (in_features // g, out_features // 8), torch.int32, out_dim=1, in_dim=0, out_per=8,
                      in_per=g),
            ParamSpec("scales", (in_features // g, out_features), torch.float16, out_dim=1, in_dim=0, in_per=g),
        ]

    def store_quantized(self, layer, q, scales, zeros, part) -> None:
        layer.part("qweight", part).copy_(pack(awq_order(q.t(), reverse=False), BITS, 1))
        layer.part("qzeros", part).copy_(pack(awq_order(zeros.t(), reverse=False), BITS, 1))
        layer.part("scales", part).copy_(scales.t())

    def kernel_weight(self, layer) -> QuantWeight:
        w = awq_order(unpack(layer.qweight.data, BITS, 1), reverse=True)  # [K, N]
        zeros = awq_order(unpack(layer.qzeros.data, BITS, 1), reverse=True)  # [groups, N]
        return QuantWeight(  # repacked along K (the kernels' layout); scales and zeros stay [groups, N]
            qweight=pack(w, BITS, 0),
            scales=layer.scales.data.contiguous(),
            bits=BITS,
            group=self.group,
            zeros=zeros.to(torch.uint8).contiguous(),
        )


def build(ops, cfg: dict[str, Any] | None):
    """``method_for(layer_name)`` of an AWQ checkpoint's quantization_config."""
    if cfg is None:
        raise ValueError("awq needs an AWQ checkpoint (config.json quantization_config); it does not quantize "
                         "a float checkpoint")
    bits = cfg.get("bits", cfg.get("w_bit", 4))
    if bits != BITS:
        raise ValueError(f"awq: {bits}-bit weights are not supported; supported bits: ({BITS},)")
    group = cfg.get("group_size", cfg.get("q_group_size", 128))
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 8:
        raise ValueError(f"awq: group_size {group!r} is not supported; supported: a positive multiple of 8 "
                         f"(e.g. 32, 64, 128)")
    version = str(cfg.get("version", "gemm")).lower()
    if version not in VERSIONS:
        raise ValueError(f"awq: version {version!r} is not supported; supported: {', '.join(VERSIONS)}")
    if cfg.get("zero_point", True) is not True:
        raise ValueError("awq: zero_point false is not supported; supported: zero_point true")
    return _with_skips(AWQMethod(ops, BITS, group), DenseMethod(ops), cfg.get("modules_to_not_convert") or [])


register_quantization(Quantization("awq", build, checkpoint_methods=("awq",)))
