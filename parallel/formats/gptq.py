"""GPTQ checkpoints (``quantization_config.quant_method == "gptq"``), kept quantized.

Config keys read: ``bits`` (4 or 8), ``group_size`` (-1 or a positive
multiple of 32 // bits), ``desc_act``, ``sym``, ``checkpoint_format``
("gptq": v1 zero points stored minus one, the default; "gptq_v2": as is),
``lm_head`` (a quantized LM head is refused), ``modules_to_not_convert``
(those layers stay float). Tensors per layer: ``qweight [K / P, N]``,
``qzeros [groups, N / P]``, ``scales [groups, N]``, ``g_idx [K]``
(``packing.py`` says how they pack; P = 32 // bits).

Tensor parallelism: column-parallel layers cut N of all four (qzeros in
whole words: N per rank a multiple of P). Row-parallel layers cut K: of
``qweight`` in whole words, of ``scales``/``qzeros`` in whole groups;
with ``desc_act`` a rank's input features belong to any group, so every
rank keeps all groups and its own slice of ``g_idx`` (as vLLM does).
"""

from __future__ import annotations

from typing import Any

import torch

from fleetlm.kernels.wq_linear import QuantWeight
from fleetlm.parallel.formats.base import ParamSpec
from fleetlm.parallel.formats.dense import DenseMethod
from fleetlm.parallel.formats.grouped import GroupQuantMethod, check_range
from fleetlm.parallel.formats.packing import pack, unpack
from fleetlm.parallel.formats.registry import Quantization, checkpoint_names, register_quantization

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # offset added to a stored zero point


class GPTQMethod(GroupQuantMethod):
    name = "gptq"

    def __init__(self, ops, bits: int, group: int, desc_act: bool, zero_offset: int) -> None:
        super().__init__(ops, bits, group)
        self.desc_act, self.zero_offset = desc_act, zero_offset

    def _groups_whole(self, layer) -> bool:
        """Whether this rank keeps every group (desc_act on a row-parallel layer, or one group per row)."""
        return self.group == -1 or (self.desc_act and layer.input_is_parallel)

    def checkpoint_specs(self, layer, in_features, out_features) -> list[ParamSpec]:
        p = self.pack
        if out_features % p:
            raise ValueError(f"gptq: {out_features} output features per rank do not fill whole {p}-value "
                             f"qzeros words")
        if self._groups_whole(layer):
            total_in = in_features * (layer.ctx.tp_size if layer.input_is_parallel else 1)
            groups, in_dim, in_per = (1 if self.group == -1 else -(-total_in // self.group)), None, 1
        else:
            groups, in_dim, in_per = in_features // self.group, 0, self.group
        return [
            ParamSpec("qweight", (in_features // p, out_features), torch.int32, out_dim=1, in_dim=0, in_per=p),
            ParamSpec("qzeros", (groups, out_features // p), torch.int32, out_dim=1, in_dim=in_dim, out_per=p,
                      in_per=in_per),
            ParamSpec("scales", (groups, out_features), torch.float16, out_dim=1, in_dim=in_dim, in_per=in_per),
            ParamSpec("g_idx", (in_features,), torch.int32, out_dim=None, in_dim=0),
        ]

    def load_tensor(self, layer, spec, block, part, name) -> None:
        if spec.name == "g_idx" and part is not None and layer.loaded_features["g_idx"] > 0:
            # Every shard of a merged layer carries its g_idx; they must agree (same inputs, same order).
            if not torch.equal(layer.g_idx.data, block):
                raise ValueError(f"weight {name}: act-order g_idx differs from the other projections fused "
                                 f"with it; such a checkpoint cannot be served fused")
            layer.loaded_features["g_idx"] += part[1]
            return
        super().load_tensor(layer, spec, block, part, name)

    def store_quantized(self, layer, q, scales, zeros, part) -> None:
        if self._groups_whole(layer) and self.group != -1:
            raise ValueError("gptq: dummy weights with desc_act on a row-parallel layer are not supported")
        layer.part("qweight", part).copy_(pack(q.t(), self.bits, 0))
        layer.part("scales", part).copy_(scales.t())
        stored = (zeros - self.zero_offset) & ((1 << self.bits) - 1)
        layer.part("qzeros", part).copy_(pack(stored.t(), self.bits, 1))
        k = q.shape[1]
        layer.g_idx.data.copy_(torch.arange(k, device=q.device, dtype=torch.int32) // self.group_of(k))

    def kernel_weight(self, layer) -> QuantWeight:
        k = layer.in_per_rank
        zeros = unpack(layer.qzeros.data, self.bits, 1) + self.zero_offset  # a wrapped 0 reads as 2**bits
        g_idx = layer.g_idx.data
        groups = layer.scales.shape[0]
        group = self.group_of(k)
        local = torch.arange(k, device=g_idx.device, dtype=torch.int32) // group
        if self.desc_act and self.group != -1:
            check_range(g_idx, groups, "g_idx")
            if not self._groups_whole(layer) and torch.equal(g_idx, local):
                g_idx = None  # act order that happens to be the identity: the plain kernel
        else:
            offset = int(g_idx[0]) if k and self.group != -1 else 0
            if self.group != -1 and not torch.equal(g_idx - offset, local):
                raise ValueError(f"gptq: g_idx is not k // group_size ({group}) but desc_act is false "
                                 f"(a corrupt checkpoint or a wrong quantization_config)")
            g_idx = None
        return QuantWeight(  # the checkpoint's own K-major layout: no repacking
            qweight=layer.qweight.data.contiguous(),
            scales=layer.scales.data.contiguous(),
            bits=self.bits,
            group=group if g_idx is None else self.group,
            # 4-bit zero points (with v1's wrap, up to 16) fit a byte: AWQ's dtype, so both share compiled kernels
            zeros=zeros.to(torch.uint8 if self.bits == 4 else torch.int16).contiguous(),
            g_idx=None if g_idx is None else g_idx.contiguous(),
        )


def _int(cfg: dict[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"gptq quantization_config.{key} must be an integer, got {value!r}")
    return value


def build(ops, cfg: dict[str, Any] | None):
    """``method_for(layer_name)`` of a GPTQ checkpoint's quantization_config."""
    if cfg is None:
        raise ValueError("gptq needs a GPTQ checkpoint (config.json quantization_config); it does not quantize "
                         "a float checkpoint")
    bits = _int(cfg, "bits", 4)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq: {bits}-bit weights are not supported; supported bits: {SUPPORTED_BITS}")
    group = _int(cfg, "group_size", 128)
    if group != -1 and (group <= 0 or group % (32 // bits)):
        raise ValueError(f"gptq: group_size {group} is not supported; supported: -1 or a positive multiple of "
                         f"{32 // bits} (e.g. 32, 64, 128)")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"gptq: checkpoint_format {fmt!r} is not supported; supported: {sorted(CHECKPOINT_FORMATS)}")
    if cfg.get("lm_head"):
        raise ValueError("gptq: a quantized lm_head is not supported (quantization_config.lm_head is true)")
    method = GPTQMethod(ops, bits, group, bool(cfg.get("desc_act", False)), CHECKPOINT_FORMATS[fmt])
    return _with_skips(method, DenseMethod(ops), cfg.get("modules_to_not_convert") or [])


def _with_skips(method, dense, skipped: list[str]):
    def method_for(layer_name: str):
        names = checkpoint_names(layer_name)
        hits = [any(s and s in n for s in skipped) for n in names]
        if all(hits):
            return dense
        if any(hits):
            raise ValueError(f"{layer_name}: some of its fused projections are quantized and some are not "
                             f"(modules_to_not_convert); that is not supported")
        return method

    return method_for


register_quantization(Quantization("gptq", build, checkpoint_methods=("gptq",)))
