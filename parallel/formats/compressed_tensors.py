"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``, as llm-compressor writes them).

The ``quantization_config`` is read with the ``compressed-tensors`` package
(``QuantizationConfig``: config groups of targets and schemes, an ``ignore``
list, a format). FleetLM serves the 8-bit schemes with its W8A8 method
(``w8a8.py``): weights FP8 (``type: float``) or INT8 (``type: int``),
symmetric, one scale per output channel (``strategy: channel``, scales
``[out, 1]``) or per tensor; input activations dynamic per token, static per
tensor (``input_scale``), or none (W8A16, weight-only). Tensor names are the
checkpoint's: ``weight``, ``weight_scale``, ``input_scale``. Anything else
(4-bit packs, groups, blocks, zero points, output activations) is refused
naming what is supported.

Targets and ignore entries follow compressed-tensors' matching: a module
class name (``Linear``), ``re:<pattern>`` on the module name, or the exact
name. The q/k/v and gate/up projections FleetLM fuses must share a scheme.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fleetlm.parallel.formats.base import LinearMethod
from fleetlm.parallel.formats.dense import DenseMethod
from fleetlm.parallel.formats.registry import Quantization, checkpoint_names, register_quantization
from fleetlm.parallel.formats.w8a8 import W8A8Method

SUPPORTED = ("8-bit symmetric FP8 or INT8 weights with channel or tensor scales; input activations dynamic per "
             "token, static per tensor, or none")


def _matches(name: str, target: str) -> bool:
    if target == "Linear":
        return True  # every layer FleetLM asks about is a linear layer
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _scheme_key(scheme) -> tuple:
    """(weight dtype, activations) FleetLM serves for a scheme, or a ValueError naming what is wrong."""
    w, a = scheme.weights, scheme.input_activations
    problems = []
    if w is None:
        problems.append("no weight quantization")
    else:
        if w.num_bits != 8 or str(w.type) not in ("float", "int"):
            problems.append(f"{w.num_bits}-bit {w.type} weights")
        if not w.symmetric:
            problems.append("asymmetric weights (zero points)")
        if str(w.strategy) not in ("channel", "tensor"):
            problems.append(f"weight strategy {w.strategy}")
    if a is not None:
        if w is not None and (a.num_bits != 8 or str(a.type) != str(w.type)):
            problems.append(f"{a.num_bits}-bit {a.type} activations with {w.type} weights")
        if not a.symmetric:
            problems.append("asymmetric activations")
        if not ((str(a.strategy) == "token" and a.dynamic) or (str(a.strategy) == "tensor" and not a.dynamic)):
            problems.append(f"activation strategy {a.strategy} (dynamic={a.dynamic})")
    if scheme.output_activations is not None:
        problems.append("output activation quantization")
    if problems:
        raise ValueError(f"compressed-tensors scheme for {scheme.targets}: {', '.join(problems)} not supported; "
                         f"supported: {SUPPORTED}")
    qdtype = torch.float8_e4m3fn if str(w.type) == "float" else torch.int8
    activations = "none" if a is None else ("dynamic" if a.dynamic else "static")
    return qdtype, activations


def _build(ops, config: dict[str, Any] | None):
    if config is None:
        raise ValueError("quantization='compressed-tensors' reads a compressed-tensors checkpoint; this one is float")
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig.model_validate({k: v for k, v in config.items() if k in QuantizationConfig.model_fields})
    if cfg.format not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {cfg.format!r} not supported; supported: float-quantized, "
                         f"int-quantized, naive-quantized ({SUPPORTED})")
    if cfg.kv_cache_scheme is not None:
        raise ValueError("compressed-tensors kv_cache_scheme is not supported (use kv_cache_dtype)")
    groups = [(scheme, _scheme_key(scheme)) for scheme in cfg.config_groups.values()]
    methods: dict[tuple, LinearMethod] = {}
    dense = DenseMethod(ops)
    ignore = cfg.ignore or []

    def scheme_of(name: str) -> tuple | None:
        if any(_matches(name, t) for t in ignore):
            return None
        for scheme, key in groups:
            if any(_matches(name, t) for t in scheme.targets):
                return key
        return None

    def method_for(layer_name: str) -> LinearMethod:
        keys = {scheme_of(name) for name in checkpoint_names(layer_name)}
        if len(keys) > 1:
            raise ValueError(f"compressed-tensors: the parts of {layer_name} ({', '.join(checkpoint_names(layer_name))}) "
                             "have different schemes; FleetLM fuses them into one layer of one format")
        key = keys.pop()
        if key is None:
            return dense
        if key not in methods:
            methods[key] = W8A8Method(ops, *key)
        return methods[key]

    return method_for


register_quantization(Quantization("compressed-tensors", _build, checkpoint_methods=("compressed-tensors",)))
