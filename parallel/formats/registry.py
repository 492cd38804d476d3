"""Quantization methods by name, and which one a model runs.

Each quantized format registers one :class:`Quantization` (``register_quantization``, at
import of its module, listed in ``parallel/formats/__init__.py``). Its
``name`` is vLLM's ``quantization`` value; ``checkpoint_methods`` are the
``quantization_config.quant_method`` values of ``config.json`` it reads;
``online`` says whether it can quantize a float checkpoint as it loads.

``resolve_quantization(flag, hf_config)`` runs once at the edge
(``EngineArgs``) and returns the name the model runs with: the checkpoint's
own method when no flag is given, the flag when it agrees with the
checkpoint or the checkpoint is float and the method quantizes online; any
other combination is an error naming what is accepted. A source without a
``config.json`` (a GGUF file) may put a ``quantization_config`` into the HF
config it builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Quantization:
    """A quantized weight format, as the ``quantization`` argument names it.

    ``build(ops, checkpoint_config)`` returns ``method_for(layer_name)``, the
    ``LinearMethod`` of each linear layer of the model (fused names:
    ``model.layers.0.self_attn.qkv_proj``; ``checkpoint_names`` gives the
    checkpoint's own). ``checkpoint_config`` is ``config.json``'s
    ``quantization_config``, or None when a float checkpoint is quantized
    online.
    """

    name: str
    build: Callable[[Any, dict[str, Any] | None], Callable[[str], Any]]
    checkpoint_methods: tuple[str, ...] = ()
    online: bool = False


QUANTIZATIONS: dict[str, Quantization] = {}


def register_quantization(quantization: Quantization) -> Quantization:
    if quantization.name in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization.name!r} is registered twice")
    QUANTIZATIONS[quantization.name] = quantization
    return quantization


def quantization_methods() -> list[str]:
    """The accepted values of ``quantization`` (vLLM's ``QUANTIZATION_METHODS``)."""
    return sorted(QUANTIZATIONS)


def checkpoint_quant_method(hf_config: dict[str, Any]) -> str | None:
    """``config.json``'s ``quantization_config.quant_method``, lower case (None: a float checkpoint)."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if not isinstance(method, str):
        raise ValueError(f"config.json's quantization_config has no quant_method string: {qc!r:.200}")
    return method.lower()


def resolve_quantization(flag: str | None, hf_config: dict[str, Any], model: str = "the model") -> str | None:
    """The quantization the model runs with (None: dense), or a ValueError naming the conflict."""
    accepted = ", ".join(quantization_methods())
    if flag is not None and flag not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {flag!r}; accepted: {accepted} (or none for the checkpoint's dtype)")
    stored = checkpoint_quant_method(hf_config)
    readers = [q.name for q in QUANTIZATIONS.values() if stored in q.checkpoint_methods]
    if stored is not None and not readers:
        raise ValueError(f"{model}: checkpoint quantization {stored!r} (config.json quantization_config."
                         f"quant_method) is not supported; supported: {accepted}")
    if flag is None:
        return readers[0] if readers else None
    if stored is None:
        if not QUANTIZATIONS[flag].online:
            raise ValueError(f"{model}: quantization={flag!r} needs a checkpoint quantized that way, and this one "
                             f"has no quantization_config; methods that quantize a float checkpoint at load: "
                             f"{', '.join(n for n, q in sorted(QUANTIZATIONS.items()) if q.online)}")
        return flag
    if flag not in readers:
        raise ValueError(f"{model}: quantization={flag!r} contradicts the checkpoint, which is quantized with "
                         f"{stored!r} (config.json quantization_config.quant_method); pass quantization="
                         f"{readers[0]!r} or leave it unset")
    return flag


_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def checkpoint_names(layer_name: str) -> tuple[str, ...]:
    """The checkpoint modules behind a (possibly fused) layer: ``...qkv_proj`` -> ``...q_proj``, ``...k_proj``, ..."""
    stem, _, leaf = layer_name.rpartition(".")
    parts = _FUSED.get(leaf)
    if parts is None:
        return (layer_name,)
    return tuple(f"{stem}.{p}" if stem else p for p in parts)
