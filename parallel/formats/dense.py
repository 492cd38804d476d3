"""The dense format: a float weight ``[out, in]`` in the model's dtype (fp32, bf16, fp16).

The matmul comes from the device's kernel namespace (``ops.linear``): on GPU
a split-free Triton GEMV for one bf16/fp16 decode row, cuBLAS otherwise; and
for a merged gate/up projection the GEMV fused with SiLU-and-mul.
"""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.parallel.formats.base import ActQuant, LinearMethod, ParamSpec, register


class DenseMethod(LinearMethod):
    name = "dense"

    def __init__(self, ops) -> None:
        self.linear = ops.linear
        self.linear_silu_mul = ops.linear_silu_mul
        self.silu_and_mul_quant = ops.silu_and_mul_quant

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[ParamSpec]:
        return [register(layer, ParamSpec("weight", (out_features, in_features), dtype), device)]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear(x, layer.weight, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, silu_and_mul,
                       quant: ActQuant | None = None) -> torch.Tensor:
        if quant is not None:  # a dense gate/up before a quantized down_proj
            return self.silu_and_mul_quant(self.linear(x, layer.weight, bias), quant.dtype, quant.scale)
        return self.linear_silu_mul(x, layer.weight, bias)
