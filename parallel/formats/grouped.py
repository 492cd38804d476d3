"""What AWQ and GPTQ share: integer weights in groups, kept quantized, multiplied by ``ops.wq_linear``.

A subclass declares the checkpoint's own tensors (their layout and how
each follows the output and input features, so tensor parallelism cuts
packed words, scales, zero points and ``g_idx`` at whole groups) and
converts them once, after loading, into the kernels' layout
(``kernels/wq_linear.QuantWeight``, kept as ``layer.qw``); the checkpoint
tensors are then dropped.

Checks at load: every tensor of the layer arrived (each shard of a merged
layer), scales are finite, zero points and ``g_idx`` within range; a
failure names the layer and the tensor.

On the torch backend (CPU) the weight is dequantized once, after loading,
to the model's dtype (float32: exact) and multiplied by ``ops.linear``:
the exact reference path, as GGUF on CPU; the kernels themselves are
checked against their torch reference in tests/kernels.

Dummy weights (``load_format="dummy"`` with a quantization_config, for
benchmarks): the float ``weight`` a dummy source yields is quantized
round-to-nearest into the checkpoint's own tensors as it arrives.
"""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.kernels.wq_linear import QuantWeight, dequantize
from fleetlm.parallel.formats.base import LinearMethod, ParamSpec, copy_block, register


class GroupQuantMethod(LinearMethod):
    """Base of the AWQ and GPTQ methods (``bits``, ``group``: -1 for one group per row)."""

    def __init__(self, ops, bits: int, group: int) -> None:
        self.wq_linear, self.linear = ops.wq_linear, ops.linear
        self.dequantize_at_load = ops.backend == "torch"
        self.bits, self.group = bits, group
        self.pack = 32 // bits

    # -- what a subclass provides ------------------------------------------------
    def checkpoint_specs(self, layer: nn.Module, in_features: int, out_features: int) -> list[ParamSpec]:
        raise NotImplementedError

    def store_quantized(self, layer: nn.Module, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        part: tuple[int, int] | None) -> None:
        """Write round-to-nearest ``q [n, K]``, ``scales``/``zeros [n, K/group]`` into the checkpoint tensors."""
        raise NotImplementedError

    def kernel_weight(self, layer: nn.Module) -> QuantWeight:
        raise NotImplementedError

    # -- the LinearMethod ------------------------------------------------------
    def group_of(self, in_features: int) -> int:
        return in_features if self.group == -1 else self.group

    def create_weights(self, layer, in_features, out_features, dtype, device) -> list[ParamSpec]:
        group = self.group_of(in_features)
        where = f"{type(layer).__name__} of {in_features} input x {out_features} output features per rank"
        if in_features % group:
            raise ValueError(f"{self.name}: {where}: the input features are not a multiple of the group size "
                             f"{group} (tensor parallelism must keep whole groups on each rank)")
        if in_features % self.pack:
            raise ValueError(f"{self.name}: {where}: the input features do not fill whole {self.pack}-value words")
        specs = [register(layer, s, device) for s in self.checkpoint_specs(layer, in_features, out_features)]
        layer.loaded_features = {s.name: 0 for s in specs}
        layer.compute_dtype = dtype
        # Not a tensor of the layer: the float weight of a dummy source, quantized as it arrives.
        return specs + [ParamSpec("weight", (out_features, in_features), dtype)]

    def load_tensor(self, layer, spec: ParamSpec, block: torch.Tensor, part, name: str) -> None:
        if spec.name == "weight":
            if not block.is_floating_point():
                raise ValueError(f"weight {name}: a {self.name} layer takes qweight/qzeros/scales, not an "
                                 f"integer weight")
            q, scales, zeros = self.quantize(block)
            self.store_quantized(layer, q, scales, zeros, part)
            for key in layer.loaded_features:
                layer.loaded_features[key] += layer.out_per_rank if part is None else part[1]
            return
        copy_block(layer.part(spec.name, part), block, name)
        layer.loaded_features[spec.name] += layer.out_per_rank if part is None else part[1]

    def quantize(self, w: torch.Tensor):
        from fleetlm.parallel.formats.packing import quantize_groups

        return quantize_groups(w, self.bits, self.group_of(w.shape[1]), sym=False)

    def process_weights_after_loading(self, layer) -> None:
        where = f"{self.name} layer ({type(layer).__name__})"
        for tensor, count in layer.loaded_features.items():
            if count != layer.out_per_rank:
                raise ValueError(f"{where}: the checkpoint gave {tensor} for {count} of its "
                                 f"{layer.out_per_rank} output features (missing or duplicated shards)")
        qw = self.kernel_weight(layer)
        qw.check()
        if not torch.isfinite(qw.scales.float()).all():
            raise ValueError(f"{where}: scales hold NaN or infinity (a corrupt checkpoint)")
        for tensor in layer.loaded_features:
            delattr(layer, tensor)
        if self.dequantize_at_load:
            layer.weight = nn.Parameter(dequantize(qw).to(layer.compute_dtype), requires_grad=False)
        else:
            layer.qw = qw

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dequantize_at_load:
            return self.linear(x, layer.weight, bias)
        return self.wq_linear(x, layer.qw, bias)


def check_range(values: torch.Tensor, high: int, what: str) -> None:
    """Values in ``[0, high)``, or a ValueError naming ``what`` (a corrupt packed tensor)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= high):
        raise ValueError(f"{what} holds values outside [0, {high}) (min {int(values.min())}, "
                         f"max {int(values.max())}): a corrupt checkpoint")
