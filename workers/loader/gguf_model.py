"""GGUF (llama.cpp) models as HF models: config from metadata, HF-named weights.

Weights are dequantized to float32 (Q8_0, Q4_0 and Q4_1 in torch with
gguf-py's own float operations, ``parallel/formats/gguf_blocks.py``; other
types with `gguf.quants`), a block of rows at a time: GGML quant blocks run
along the last (input) dim, so rows of a quantized tensor are independent
and a tensor-parallel rank can dequantize just its rows. Column blocks dequantize the selected rows, then slice.

llama.cpp's converter permutes the rows of q_proj/k_proj (within each head,
from HF's "first half / second half" rotary layout to interleaved pairs):
GGUF row h*D + 2*i + s holds HF row h*D + s*D/2 + i (D = head_dim, s in {0, 1},
using num_key_value_heads for k). We read GGUF rows through that map, so
weights come out in HF's layout and HF's rotate_half rotary applies.

Kept quantized (``quantization="gguf"``, the default on GPU): the linear
projections whose block type the kernels read (``parallel/formats/
gguf_blocks.py``) come as their raw blocks instead, uint8 ``[N, K / B, T]``
(rows permuted the same way; a tensor-parallel cut of the input features
takes whole blocks). ``gguf_quantization_config`` names each projection's type.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from fleetlm.parallel.formats import gguf_blocks
from fleetlm.workers.loader.gguf_format import GGUFHeader, GGUFTensorInfo, map_file, tensor_bytes
from fleetlm.workers.loader.lazy import LazyTensor

# general.architecture -> (HF architectures[0], HF model_type)
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama")}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# GGUF {arch}.rope.scaling.<key> -> HF rope_scaling key
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)")
_MISSING = object()


def gguf_hf_config(header: GGUFHeader) -> dict[str, Any]:
    """Translate GGUF metadata into an HF config.json dict (LlamaConfig keys)."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{header.path}: GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})")

    def key(name: str, default: Any = _MISSING) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is _MISSING:
            raise ValueError(f"{header.path}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = _uniform(key("attention.head_count_kv", num_heads), "attention.head_count_kv")
    head_dim = int(key("attention.key_length", hidden // num_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{header.path}: partial rotary (rope.dimension_count != head_dim) is not supported")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens is not None else int(key("vocab_size"))
    architecture, model_type = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(header, arch),
        "vocab_size": vocab_size,
        # llama.cpp omits output.weight when the head is tied to the embedding.
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "mlp_bias": False,
        # Dequantized GGUF weights are exact in float32, not in 16-bit types.
        "torch_dtype": "float32",
    }

    for gguf_key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{gguf_key}_token_id" in md:
            config[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}_token_id"])
    return config


def gguf_quantization_config(header: GGUFHeader) -> dict[str, Any]:
    """The ``quantization_config`` of a GGUF file run kept quantized: each projection's block type."""
    types = {hf_tensor_name(name)[: -len(".weight")]: info.qtype.name for name, info in header.tensors.items()
             if len(info.shape) == 2 and _is_projection(name)}
    return {"quant_method": "gguf", "tensor_types": types}


def _rope_scaling(header: GGUFHeader, arch: str) -> dict[str, Any] | None:
    md = header.metadata
    if "rope_freqs.weight" in header.tensors:
        # Llama-3-style scaling is stored as per-frequency factors, not as the
        # parameters HF's rope takes; ignoring them would be silently wrong.
        raise ValueError(
            f"{header.path}: GGUF files with a rope_freqs tensor (Llama 3 rope scaling) are not "
            "supported yet; load the HF safetensors directory instead"
        )
    scaling_type = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "none":
        linear = md.get(f"{arch}.rope.scale_linear")  # older files
        if linear is not None and float(linear) != 1.0:
            return {"rope_type": "linear", "factor": _f32(linear)}
        return None
    scaling: dict[str, Any] = {"rope_type": scaling_type}
    for gguf_key, hf_key in _ROPE_SCALING_KEYS.items():
        value = md.get(f"{arch}.rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = int(value) if hf_key == "original_max_position_embeddings" else _f32(value)
    return scaling


def _f32(value: Any) -> float:
    """GGUF stores floats as float32; write the shortest decimal that is the
    same float32 (9.999999747e-06 -> 1e-05), as HF's config.json has it."""
    return float(str(np.float32(value)))


def _uniform(value: Any, what: str) -> int:
    values = np.atleast_1d(np.asarray(value))
    if values.size == 0 or (values != values[0]).any():
        raise ValueError(f"per-layer {what} ({values.tolist()}) is not supported")
    return int(values[0])


def hf_tensor_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight, etc."""
    stem, _, suffix = gguf_name.rpartition(".")
    layer = _LAYER_RE.fullmatch(stem)
    if layer and layer[2] in _LAYER_NAMES:
        return f"model.layers.{layer[1]}.{_LAYER_NAMES[layer[2]]}.{suffix}"
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def _is_projection(gguf_name: str) -> bool:
    layer = _LAYER_RE.fullmatch(gguf_name.rpartition(".")[0])
    return bool(layer) and _LAYER_NAMES.get(layer[2], "").endswith("_proj") and gguf_name.endswith(".weight")


def iter_gguf_weights(
    header: GGUFHeader, hf_config: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
    keep_quantized: bool = False,
) -> Iterator[tuple[str, LazyTensor]]:
    """(HF name, LazyTensor) for every tensor of the file, in file order; with ``keep_quantized``
    the projections of a block type the kernels read come as raw blocks (see the module docstring)."""
    from fleetlm.parallel.formats.gguf_blocks import BLOCKS

    file_map = map_file(header.path)
    for info in header.tensors.values():
        if len(info.shape) > 2:
            raise ValueError(f"{header.path}: {info.name} has {len(info.shape)} dims; only 1-D and 2-D are supported")
        hf_name = hf_tensor_name(info.name)
        rotary_heads = None
        if ".self_attn.q_proj." in hf_name:
            rotary_heads = hf_config["num_attention_heads"]
        elif ".self_attn.k_proj." in hf_name:
            rotary_heads = hf_config["num_key_value_heads"]
        if keep_quantized and _is_projection(info.name) and info.qtype.name in BLOCKS:
            block, size = BLOCKS[info.qtype.name]
            shape = (info.shape[0], info.shape[1] // block, size)
            yield hf_name, LazyTensor(shape, torch.uint8, device, _RawBlocks(file_map, info, rotary_heads))
            continue
        reader = _GGUFReader(file_map, info, rotary_heads)
        yield hf_name, LazyTensor(info.shape, dtype, device, reader)


class _GGUFReader:
    """Reads HF rows [rows] (and columns [cols]) of one GGUF tensor."""

    def __init__(self, file_map: np.ndarray, info: GGUFTensorInfo, rotary_heads: int | None):
        self.file_map = file_map
        self.info = info
        self.rotary_heads = rotary_heads

    def __call__(self, rows: slice, cols: slice | None) -> torch.Tensor:
        raw = tensor_bytes(self.file_map, self.info)
        index: slice | np.ndarray = rows
        if self.rotary_heads is not None:
            index = _gguf_rows(np.arange(rows.start, rows.stop), self.info.shape[0], self.rotary_heads)
        if len(self.info.shape) == 1:  # one GGML row: dequantize it whole, then pick
            values = dequantize(raw, self.info.qtype).reshape(-1)[index]
        else:
            rows_raw = raw[index]
            if self.info.qtype.name in gguf_blocks.TORCH_DEQUANTIZED:
                if not rows_raw.flags.writeable:  # a slice is a view of the read-only map
                    rows_raw = rows_raw.copy()
                values = gguf_blocks.dequantize(torch.from_numpy(rows_raw), self.info.qtype.name)
                return values if cols is None else values[:, cols].contiguous()
            values = dequantize(rows_raw, self.info.qtype)
            if cols is not None:
                values = values[:, cols]
        if not values.flags.writeable:  # an F32 tensor is a view of the read-only map
            values = values.copy()
        return torch.from_numpy(values)


class _RawBlocks(_GGUFReader):
    """Raw quantization blocks [rows, blocks, bytes] of one GGUF projection (HF row order)."""

    def __call__(self, rows: slice, cols: slice | None) -> torch.Tensor:
        raw = tensor_bytes(self.file_map, self.info)
        index: slice | np.ndarray = rows
        if self.rotary_heads is not None:
            index = _gguf_rows(np.arange(rows.start, rows.stop), self.info.shape[0], self.rotary_heads)
        block, size = GGML_QUANT_SIZES[self.info.qtype]
        values = np.ascontiguousarray(raw[index]).reshape(-1, self.info.shape[1] // block, size)
        if cols is not None:
            values = values[:, cols]
        return torch.from_numpy(np.array(values))  # a copy: the map is read-only


def _gguf_rows(hf_rows: np.ndarray, num_rows: int, num_heads: int) -> np.ndarray:
    """GGUF row holding each HF row of a rotary-permuted q/k projection."""
    head_dim = num_rows // num_heads
    half = head_dim // 2
    head, within = np.divmod(hf_rows, head_dim)
    s, i = np.divmod(within, half)
    return head * head_dim + 2 * i + s
