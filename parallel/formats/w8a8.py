"""8-bit weights with one scale per output channel: FP8 E4M3 and INT8 (W8A8, or weight-only W8A16).

Tensors of a layer (the names vLLM's and compressed-tensors' checkpoints use):
``weight [out, in]`` (E4M3 or INT8 codes), ``weight_scale [out]`` fp32 (a
checkpoint's per-tensor scale, or ``[out, 1]`` per-channel scales, are
stored per channel: a merged q/k/v layer keeps each shard's own), and with
static activation scales ``input_scale [1]`` (merged shards share the
largest, as vLLM does). Tensor parallelism cuts ``weight`` like a dense
weight and ``weight_scale`` with the output features; a row-parallel layer
keeps every scale.

Activations (``activations``): "dynamic" quantizes each token with its own
scale, "static" with the checkpoint's ``input_scale``, "none" keeps them
16-bit (weight-only: the weight is dequantized for the matmul; the exact
reference of CPU tests). The producer of a layer's input quantizes it in
the same kernel when it can (``input_quant``: RMSNorm, SiLU-and-mul); a
float input is quantized here. Batches of 2-16 rows take ``scaled_mm``'s
Triton tensor-core kernel, more rows cuBLAS (kernels/qlinear.py); one 16-bit
row on GPU (batch-1 decode) takes the FP8/INT8 GEMV with a 16-bit activation,
W8A8 or not: it measured faster there.

Online quantization (``quantization="fp8"`` / ``"int8"`` on a float
checkpoint, or dummy weights): each float ``weight`` block is quantized as
it is read (per output channel, absmax / QMAX), so a layer never holds its
float weight and peak memory is the quantized model plus one float tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.kernels.quant import QMAX, QuantizedActivation, quantize_ref
from fleetlm.parallel.formats.base import ActQuant, LinearMethod, ParamSpec, copy_block, register
from fleetlm.parallel.formats.dense import DenseMethod
from fleetlm.parallel.formats.registry import Quantization, checkpoint_names, register_quantization

ACTIVATIONS = ("dynamic", "static", "none")
_ROWS_PER_PASS = 4096  # online quantization's float32 scratch: 4096 rows at a time


def quantize_weight(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale [out]) of a float weight, one absmax scale per output channel."""
    codes = torch.empty(w.shape, dtype=qdtype, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for lo in range(0, w.shape[0], _ROWS_PER_PASS):
        q = quantize_ref(w[lo:lo + _ROWS_PER_PASS], qdtype)
        codes[lo:lo + _ROWS_PER_PASS] = q.data
        scale[lo:lo + _ROWS_PER_PASS] = q.scale.view(-1)
    return codes, scale


@functools.lru_cache(maxsize=None)
def check_device(qdtype: torch.dtype, device: torch.device) -> None:
    """FP8 needs FP8 tensor cores (compute capability 8.9: Ada, Hopper and later): refused at start elsewhere."""
    if qdtype != torch.float8_e4m3fn or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"FP8 weights need FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                         f"Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}. Serve "
                         "quantization='int8' or the bf16 checkpoint on this GPU")


class W8A8Method(LinearMethod):
    def __init__(self, ops, qdtype: torch.dtype, activations: str = "dynamic", online: bool = False) -> None:
        if qdtype not in QMAX:
            raise ValueError(f"8-bit weights are FP8 E4M3 or INT8, got {qdtype}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.ops, self.qdtype, self.activations, self.online = ops, qdtype, activations, online
        self.name = f"{'fp8' if qdtype == torch.float8_e4m3fn else 'int8'}-w8a{'16' if activations == 'none' else '8'}"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[ParamSpec]:
        check_device(self.qdtype, torch.device(device))
        specs = [register(layer, ParamSpec("weight", (out_features, in_features), self.qdtype), device),
                 register(layer, ParamSpec("weight_scale", (out_features,), torch.float32, in_dim=None), device)]
        if self.activations == "static":
            specs.append(register(layer, ParamSpec("input_scale", (1,), torch.float32, out_dim=None, in_dim=None),
                                  device))
            layer.input_scale.data.zero_()  # the largest shard's scale wins (load_tensor)
        return specs

    def load_tensor(self, layer: nn.Module, spec: ParamSpec, block: torch.Tensor, part: tuple[int, int] | None,
                    name: str) -> None:
        dst = layer.part(spec.name, part)
        if spec.name == "weight" and block.dtype != self.qdtype:
            if not (self.online and block.dtype in (torch.float32, torch.bfloat16, torch.float16)):
                raise ValueError(f"weight {name}: the checkpoint stores {block.dtype}, this {self.name} layer "
                                 f"expects {self.qdtype}")
            codes, scale = quantize_weight(block, self.qdtype)
            copy_block(dst, codes, name)
            copy_block(layer.part("weight_scale", part), scale, name)
        elif spec.name in ("weight_scale", "input_scale"):
            if block.numel() != 1 and block.numel() != dst.numel():
                raise ValueError(f"weight {name}: {tuple(block.shape)} scales for {dst.numel()} "
                                 f"{'output channels' if spec.name == 'weight_scale' else 'values'}")
            value = block.to(torch.float32).reshape(-1).expand(dst.numel()).view(dst.shape)
            dst.copy_(torch.maximum(dst, value) if spec.name == "input_scale" else value)
        else:
            copy_block(dst, block, name)

    # -- forward -------------------------------------------------------------------
    def _gemv(self, rows: int, dtype: torch.dtype) -> bool:
        # One 16-bit row on GPU (batch-1 decode) takes the GEMV with its activation kept 16-bit, W8A8
        # or not: on an H100 (8B, INT8) batch-1 decode ran 250 tok/s through it and 212 through
        # small_mm with quantized activations (benchmarks/results/gpu-w8a8-20261206-152451.json).
        return self.ops.backend == "triton" and rows == 1 and dtype in (torch.bfloat16, torch.float16)

    def input_quant(self, layer: nn.Module, x) -> ActQuant | None:
        if self.activations == "none" or self._gemv(x.shape[0], x.dtype):
            return None
        return ActQuant(self.qdtype, layer.input_scale if self.activations == "static" else None)

    def _quantized(self, layer: nn.Module, x: torch.Tensor) -> QuantizedActivation:
        return self.ops.quantize(x, self.qdtype, layer.input_scale if self.activations == "static" else None)

    def apply(self, layer: nn.Module, x, bias: torch.Tensor | None) -> torch.Tensor:
        w, s = layer.weight, layer.weight_scale
        if isinstance(x, QuantizedActivation):
            return self.ops.scaled_mm(x, w, s, bias)
        if self._gemv(x.shape[0], x.dtype) and self.ops.qgemv_applies(x, w):
            return self.ops.qgemv(x, w, s, bias)
        if self.activations == "none":
            return F.linear(x, (w.to(torch.float32) * s[:, None]).to(x.dtype), bias)
        return self.ops.scaled_mm(self._quantized(layer, x), w, s, bias)

    def apply_silu_mul(self, layer: nn.Module, x, bias: torch.Tensor | None, silu_and_mul,
                       quant: ActQuant | None = None) -> torch.Tensor:
        if (bias is None and quant is None and not isinstance(x, QuantizedActivation)
                and self._gemv(x.shape[0], x.dtype) and self.ops.qgemv_applies(x, layer.weight)):
            return self.ops.qgemv_silu_mul(x, layer.weight, layer.weight_scale)
        y = self.apply(layer, x, bias)
        return silu_and_mul(y) if quant is None else self.ops.silu_and_mul_quant(y, quant.dtype, quant.scale)


# -- registration: "fp8" (vLLM's checkpoints and online) and "int8" (online) ----------------


def _build_fp8(ops, config: dict[str, Any] | None):
    if config is None:
        method = W8A8Method(ops, torch.float8_e4m3fn, "dynamic", online=True)
        return lambda layer_name: method
    known = {"quant_method", "activation_scheme", "ignored_layers", "modules_to_not_convert", "fmt",
             "weight_block_size", "is_checkpoint_fp8_serialized"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"fp8 quantization_config: unknown key(s) {', '.join(unknown)}")
    if config.get("weight_block_size"):
        raise ValueError(f"fp8 quantization_config: block-wise scales (weight_block_size="
                         f"{config['weight_block_size']}) are not supported; supported: one scale per tensor or "
                         "per output channel (weight_scale), dynamic or static (input_scale) activations")
    if config.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"fp8 quantization_config: fmt {config['fmt']!r} is not supported (only e4m3)")
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 quantization_config: activation_scheme {scheme!r}; supported: dynamic, static")
    ignored = set(config.get("ignored_layers") or ()) | set(config.get("modules_to_not_convert") or ())
    method, dense = W8A8Method(ops, torch.float8_e4m3fn, scheme), DenseMethod(ops)

    def method_for(layer_name: str) -> LinearMethod:
        parts = checkpoint_names(layer_name)
        skipped = [p for p in parts if p in ignored or p.rpartition(".")[2] in ignored]
        if skipped and len(skipped) != len(parts):
            raise ValueError(f"fp8 checkpoint: {', '.join(skipped)} unquantized but the rest of {layer_name} "
                             "quantized; FleetLM fuses them into one layer of one format")
        return dense if skipped else method

    return method_for


def _build_int8(ops, config: dict[str, Any] | None):
    method = W8A8Method(ops, torch.int8, "dynamic", online=True)
    return lambda layer_name: method


register_quantization(Quantization("fp8", _build_fp8, checkpoint_methods=("fp8",), online=True))
register_quantization(Quantization("int8", _build_int8, online=True))
