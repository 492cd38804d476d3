"""AWQ and GPTQ checkpoints of the embedded model, written as the real tools write them.

The packing here follows the tools' own code paths, not FleetLM's
(``parallel/formats/packing.py``), so a shared misreading cannot hide:

- AWQ (AutoAWQ ``WQLinear_GEMM.from_linear``): ``intweight [K, N]``; for each
  word column ``c`` and field ``i``, ``qweight[:, c] |= intweight[:, 8c +
  order_map[i]] << 4i`` with ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``; qzeros
  the same on ``[groups, N]``; scales ``[groups, N]`` float16.
- GPTQ (AutoGPTQ / GPTQModel ``pack``): ``qweight[row] |= intweight[j] <<
  bits * (j - i)`` for ``j`` in the row's ``32 // bits`` input features;
  zeros minus one (v1) packed along N the same way; ``g_idx`` int32.

The float32 reference weights are the formats' published dequantization,
``(q - zero) * scale``, computed here from the unpacked integers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fleetlm.workers.loader import iter_weights, load_tokenizer, resolve_model

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def embedded_float_weights(model: str = "smollm2-135m-instruct"):
    source = resolve_model(model)
    weights = {name: lazy.load() for name, lazy in iter_weights(source, dtype=torch.float32)}
    return source, weights


def _rtn(w: np.ndarray, groups: np.ndarray, num_groups: int, bits: int, sym: bool) -> tuple:
    """Round to nearest per (output row, group): q [N, K], scales [N, G] float16, zeros [N, G]."""
    maxq = (1 << bits) - 1
    n, _ = w.shape
    scales = np.zeros((n, num_groups), np.float16)
    zeros = np.zeros((n, num_groups), np.int64)
    q = np.zeros(w.shape, np.int64)
    for g in range(num_groups):
        cols = groups == g
        block = w[:, cols].astype(np.float32)
        if sym:
            s = (2 * np.abs(block).max(1) / maxq).astype(np.float16)
            z = np.full(n, (maxq + 1) // 2)
        else:
            lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
            s = ((hi - lo) / maxq).astype(np.float16)
            z = np.clip(np.round(-lo / s.astype(np.float32)), 1, maxq).astype(np.int64)  # never 0: v1 stores z - 1
        s = np.where(s == 0, np.float16(1e-4), s)
        q[:, cols] = np.clip(np.round(block / s.astype(np.float32)[:, None]) + z[:, None], 0, maxq)
        scales[:, g], zeros[:, g] = s, z
    return q, scales, zeros


def _dequant(q, scales, zeros, groups) -> torch.Tensor:
    s = torch.from_numpy(scales.astype(np.float32))[:, groups]
    z = torch.from_numpy(zeros.astype(np.float32))[:, groups]
    return (torch.from_numpy(q.astype(np.float32)) - z) * s


def _pack_awq(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's loop: [R, C] ints -> [R, C / 8] int32, fields in order_map order."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << np.uint32(i * 4)
    return out.view(np.int32)


def _pack_gptq_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight loop: [K, N] -> [K / P, N], P consecutive rows per word."""
    per = 32 // bits
    out = np.zeros((intweight.shape[0] // per, intweight.shape[1]), np.uint32)
    i = row = 0
    while row < out.shape[0]:
        for j in range(i, i + per):
            out[row] |= intweight[j].astype(np.uint32) << np.uint32(bits * (j - i))
        i += per
        row += 1
    return out.view(np.int32)


def _pack_gptq_cols(zeros: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qzeros loop: [G, N] -> [G, N / P], P consecutive columns per word."""
    per = 32 // bits
    out = np.zeros((zeros.shape[0], zeros.shape[1] // per), np.uint32)
    i = col = 0
    while col < out.shape[1]:
        for j in range(i, i + per):
            out[:, col] |= zeros[:, j].astype(np.uint32) << np.uint32(bits * (j - i))
        i += per
        col += 1
    return out.view(np.int32)


def write_checkpoint(out_dir: Path, method: str, *, bits: int = 4, group: int = 64, sym: bool = False,
                     desc_act: bool = False, seed: int = 0, model: str = "smollm2-135m-instruct"):
    """Write an AWQ or GPTQ checkpoint of ``model`` to ``out_dir``; returns {HF name: float32 reference}."""
    source, weights = embedded_float_weights(model)
    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    reference = dict(weights)
    perms: dict[tuple[int, int], np.ndarray] = {}  # one act order per input (q/k/v share theirs, gate/up too)
    for name, w in weights.items():
        stem = name[: -len(".weight")]
        if not any(stem.endswith(p) for p in PROJECTIONS):
            tensors[name] = w.contiguous()
            continue
        wn = w.numpy()
        n, k = wn.shape
        group_k = k if group == -1 else group  # -1: one group per output row
        num_groups = k // group_k
        if desc_act:
            key = (int(stem.split(".")[2]), 0 if stem.endswith(("q_proj", "k_proj", "v_proj")) else
                   1 if stem.endswith(("gate_proj", "up_proj")) else 2 + stem.endswith("down_proj"))
            perm = perms.setdefault(key, rng.permutation(k))
            groups = np.empty(k, np.int64)
            groups[perm] = np.arange(k) // group_k  # g_idx[perm[i]] = i // group, as GPTQ's act order writes
        else:
            groups = np.arange(k) // group_k
        q, scales, zeros = _rtn(wn, groups, num_groups, bits, sym)
        reference[name] = _dequant(q, scales, zeros, groups)
        if method == "awq":
            tensors[f"{stem}.qweight"] = torch.from_numpy(_pack_awq(q.T.copy()))
            tensors[f"{stem}.qzeros"] = torch.from_numpy(_pack_awq(zeros.T.copy()))
            tensors[f"{stem}.scales"] = torch.from_numpy(scales.T.copy())
        else:
            tensors[f"{stem}.qweight"] = torch.from_numpy(_pack_gptq_rows(q.T.copy(), bits))
            tensors[f"{stem}.qzeros"] = torch.from_numpy(_pack_gptq_cols((zeros - 1).T.copy(), bits))
            tensors[f"{stem}.scales"] = torch.from_numpy(scales.T.copy())
            tensors[f"{stem}.g_idx"] = torch.from_numpy(groups.astype(np.int32))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in source.hf_config.items() if k != "torch_dtype"}
    config["torch_dtype"] = "float16"
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group,
                                         "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                         "desc_act": desc_act, "sym": sym, "true_sequential": True,
                                         "damp_percent": 0.01, "static_groups": False, "lm_head": False,
                                         "checkpoint_format": "gptq"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    load_tokenizer(source).save_pretrained(str(out_dir))
    return reference


def hf_model_from_weights(hf_config: dict, weights: dict[str, torch.Tensor]):
    """transformers' Llama in float32 on ``weights`` (HF names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in hf_config.items() if k not in ("architectures", "quantization_config", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    return model.eval()


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str):
    """gguf-py's reader of a file (parsing the embedded model's 49k-token vocabulary takes ~5 s: once per run)."""
    import gguf

    return gguf.GGUFReader(path)


def write_gguf(out_path: Path, types: dict[str, str], model: str = "smollm2-135m-instruct") -> None:
    """Copy the embedded GGUF file with gguf-py's writer, re-encoding projections as ``types``.

    ``types`` maps a GGUF projection stem (``attn_q``, ``ffn_down``, ...) to a
    block type; a tensor whose row length is not a whole number of that
    type's blocks keeps its own type (as llama.cpp falls back). Re-encoding
    starts from gguf-py's dequantization of the file's rows (GGUF row order).
    """
    import gguf
    from gguf.quants import dequantize

    from fleetlm.parallel.formats.gguf_blocks import BLOCKS, encode

    reader = _gguf_reader(str(resolve_model(model).path))
    writer = gguf.GGUFWriter(str(out_path), arch=str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        stem = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        qtype = types.get(stem)
        rows, k = int(t.shape[1]) if len(t.shape) > 1 else 1, int(t.shape[0])
        if qtype is not None and k % BLOCKS[qtype][0] == 0:
            floats = dequantize(np.asarray(t.data).reshape(rows, -1), t.tensor_type).reshape(rows, k)
            raw = encode(torch.from_numpy(floats.copy()), qtype).reshape(rows, -1).numpy()
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
