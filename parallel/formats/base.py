"""What a weight format is: the tensors a linear layer holds, how they shard, how they multiply.

A :class:`LinearMethod` belongs to a format (dense today; FP8, INT4 and
GGUF blocks to come). For one layer it

- declares the layer's tensors (``create_weights``, returning a
  :class:`ParamSpec` per tensor, the tensor registered on the layer under
  the checkpoint's own suffix: ``weight``, ``weight_scale``, ``qweight``...);
- says through each spec how the tensor follows the layer's output and
  input features, so ``parallel/layers.py`` can cut any checkpoint tensor
  to a tensor-parallel rank's share without knowing the format: packed
  dims (8 int4 values per int32) and group-wise scales or zero points (one
  per ``group`` input features) divide the feature offsets;
- may fix up the loaded tensors once (``process_weights_after_loading``:
  repacking, quantizing a float checkpoint online);
- computes ``y = x W^T (+ b)`` (``apply``), and optionally the fused
  ``silu(gate) * up`` of a merged gate/up projection (``apply_silu_mul``).

Models never touch a layer's tensors; they call the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """One tensor of a layer, in this rank's shape.

    ``out_dim`` / ``in_dim``: the tensor dimension that runs along the
    layer's output / input features (None: the tensor does not, e.g. a
    per-tensor scale, which every rank keeps whole). ``out_per`` /
    ``in_per``: features per element along that dimension (a pack factor, or
    a quantization group size; 1 for a plain weight).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    out_dim: int | None = 0
    in_dim: int | None = 1
    out_per: int = 1
    in_per: int = 1

    def element_range(self, dim_features: tuple[int, int], per: int, what: str) -> slice:
        lo, hi = dim_features
        if lo % per or hi % per:
            raise ValueError(f"{self.name}: features [{lo}, {hi}) do not fall on whole elements of {per} "
                             f"along its {what} dimension (tensor parallelism must split whole groups)")
        return slice(lo // per, hi // per)


class LinearMethod:
    """A weight format's behaviour for one linear layer; stateless, shared by layers."""

    name = "abstract"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[ParamSpec]:
        """Register this rank's tensors on ``layer`` (``in_features x out_features`` per rank)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once every tensor of ``layer`` is loaded."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, silu_and_mul) -> torch.Tensor:
        """``silu(gate) * up`` of a merged [gate; up] projection; formats with a fused kernel override it."""
        return silu_and_mul(self.apply(layer, x, bias))


def register(layer: nn.Module, spec: ParamSpec, device: torch.device | str) -> ParamSpec:
    layer.register_parameter(spec.name, nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype, device=device),
                                                     requires_grad=False))
    return spec
