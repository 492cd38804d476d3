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
- stores each checkpoint block it is given (``load_tensor``: a copy by
  default; a format that quantizes online turns a float ``weight`` block
  into its own tensors here, so no layer ever holds the float weight);
- may fix up the loaded tensors once (``process_weights_after_loading``:
  repacking, scales of merged shards);
- computes ``y = x W^T (+ b)`` (``apply``), and optionally the fused
  ``silu(gate) * up`` of a merged gate/up projection (``apply_silu_mul``);
- may ask the producer of its input for it quantized (``input_quant``):
  the RMSNorm before it, or the SiLU-and-mul of the gate/up projection,
  then quantize in their own kernel and hand over a ``QuantizedActivation``
  (kernels/quant.py), which ``apply`` takes as well as a float tensor.

Models never touch a layer's tensors; they call the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ActQuant:
    """How a layer wants its input quantized: to ``dtype`` (FP8 E4M3, INT8) per token, or by static ``scale``."""

    dtype: torch.dtype
    scale: torch.Tensor | None = None


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

    def load_tensor(self, layer: nn.Module, spec: ParamSpec, block: torch.Tensor, part: tuple[int, int] | None,
                    name: str) -> None:
        """Store checkpoint ``block`` (this rank's cut of ``name``) as tensor ``spec.name``.

        ``part``: (first output feature, count) of a merged layer's shard the
        block fills (None: the whole tensor); ``layer.part(spec_name, part)``
        is the destination view. A block of one element is a per-tensor value.
        """
        copy_block(layer.part(spec.name, part), block, name)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once every tensor of ``layer`` is loaded."""

    def input_quant(self, layer: nn.Module, x) -> ActQuant | None:
        """How this layer wants input ``x`` (its rows and dtype matter) from its producer; None: as it is."""
        return None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, silu_and_mul,
                       quant: ActQuant | None = None) -> torch.Tensor:
        """``silu(gate) * up`` of a merged [gate; up] projection; formats with a fused kernel override it.

        ``quant``: the consumer's ``input_quant``; a format may return the
        result quantized that way, or float (the consumer then quantizes it).
        """
        return silu_and_mul(self.apply(layer, x, bias))


def copy_block(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """``dst.copy_(src)`` of the same shape; integer and FP8 tensors are never converted silently."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name}: checkpoint shard {tuple(src.shape)} != parameter {tuple(dst.shape)}")
    if dst.dtype != src.dtype and not (_is_float(dst.dtype) and _is_float(src.dtype)):
        raise ValueError(f"weight {name}: checkpoint dtype {src.dtype} cannot be stored as {dst.dtype}")
    dst.copy_(src)


def _is_float(dtype: torch.dtype) -> bool:
    """A float type a checkpoint value may be cast to or from (not FP8: its rounding loses the value)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def register(layer: nn.Module, spec: ParamSpec, device: torch.device | str) -> ParamSpec:
    layer.register_parameter(spec.name, nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype, device=device),
                                                     requires_grad=False))
    return spec
