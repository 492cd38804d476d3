"""Quantized checkpoints of the embedded model, written as the real tools write them.

- ``fp8_checkpoint``: vLLM's / AutoFP8's ``quant_method: "fp8"`` layout:
  ``weight`` E4M3, ``weight_scale`` fp32 (a 0-d tensor per tensor, or
  ``[out]`` per channel), ``input_scale`` (0-d) with ``activation_scheme:
  static``; LM head and embeddings unquantized, ``ignored_layers`` naming the head.
- ``compressed_tensors_checkpoint``: llm-compressor's layout, written by the
  ``compressed-tensors`` package itself: a preset scheme (``FP8_DYNAMIC``,
  ``W8A8``, ``FP8``..., or ``FP8_W8A16``: FP8 channel weights alone) applied to every Linear but ``lm_head``;
  scales from ``calculate_qparams`` over each output channel (``[out, 1]``),
  weights compressed by the package's compressor for the format, the config
  written by ``ModelCompressor.update_config``. ``smooth=alpha`` first folds
  SmoothQuant's per-channel smoothing (migration strength alpha;
  llm-compressor's default is 0.5; its Llama mappings) into the norms and weights, from activation maxima on a
  calibration text: the model is the same function in float, its
  activations easier to quantize.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fleetlm.workers.loader import iter_weights, load_tokenizer

CALIBRATION_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way. There were a king with a large jaw and a queen with a plain face, on the throne of England; "
    "there were a king with a large jaw and a queen with a fair face, on the throne of France. "
    "def mean(xs):\n    return sum(xs) / len(xs)\n\nThe committee will meet on Tuesday at 10 a.m. to review "
    "the budget, the hiring plan and the roadmap for next year."
)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def float_state(source) -> dict[str, torch.Tensor]:
    return {name: lazy.load() for name, lazy in iter_weights(source, dtype=torch.float32)}


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{m}." in name for m in LINEARS)


def _write(path: Path, source, state: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in source.hf_config.items()}
    config["torch_dtype"] = "float32"
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    load_tokenizer(source).save_pretrained(str(path))
    return path


def fp8_checkpoint(path: Path, source, *, per_channel: bool, static: bool = False,
                   input_absmax: dict[str, float] | None = None) -> Path:
    state = {}
    for name, w in float_state(source).items():
        if not is_linear(name):
            state[name] = w
            continue
        prefix = name[: -len(".weight")]
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
        scale = (amax.clamp_min(1e-12) / 448.0).float()
        q = (w / (scale[:, None] if per_channel else scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
        state[name], state[f"{prefix}.weight_scale"] = q, scale
        if static:
            state[f"{prefix}.input_scale"] = torch.tensor(input_absmax[prefix] / 448.0, dtype=torch.float32)
    qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic", "ignored_layers": ["lm_head"]}
    return _write(path, source, state, qc)


def compressed_tensors_checkpoint(path: Path, source, preset: str, *, smooth: float | None = None,
                                  calibration: dict | None = None) -> Path:
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    if preset == "FP8_W8A16":  # FP8 channel weights, 16-bit activations (vLLM's CompressedTensorsW8A16Fp8)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float",
                                                                                 strategy="channel", symmetric=True))
    else:
        scheme = preset_name_to_scheme(preset, ["Linear"])
    fmt = CompressionFormat.float_quantized if scheme.weights.type == "float" else CompressionFormat.int_quantized
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    state = float_state(source)
    if smooth is not None:
        smooth_quant(state, calibration, source.hf_config["num_hidden_layers"], alpha=smooth)
    out = {}
    for name, w in state.items():
        if not is_linear(name):
            out[name] = w
            continue
        prefix = name[: -len(".weight")]
        if scheme.weights.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale, _ = calculate_qparams(lo, hi, scheme.weights)
        module = {"weight": w, "weight_scale": scale.to(w.dtype)}
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            amax = torch.tensor([calibration["absmax"][prefix].max().item()])
            module["input_scale"], _ = calculate_qparams(-amax, amax, scheme.input_activations)
        for key, value in compressor.compress(module, scheme).items():
            out[f"{prefix}.{key}"] = value
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=fmt.value,
                                 quantization_status=QuantizationStatus.COMPRESSED)
    _write(path, source, out, None)
    ModelCompressor(quantization_config=qconfig).update_config(str(path))
    return path


@torch.inference_mode()
def calibrate(hf_model, tokenizer, text: str = CALIBRATION_TEXT) -> dict:
    """Per-input-channel max |x| of every linear layer's input (by module name), over ``text``."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            def hook(mod, args, name=name):
                a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
                absmax[name] = torch.maximum(absmax[name], a) if name in absmax else a
            hooks.append(module.register_forward_pre_hook(hook))
    ids = tokenizer.encode(text, add_special_tokens=False)
    hf_model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {"absmax": absmax}


def smooth_quant(state: dict[str, torch.Tensor], calibration: dict, num_layers: int, alpha: float = 0.5) -> None:
    """Fold SmoothQuant's smoothing into ``state`` in place: for each (producer, consumers) mapping,
    x_j /= s_j in the producer and W[:, j] *= s_j in the consumers, s_j = max|x_j|^a / max|W[:, j]|^(1-a)."""
    for i in range(num_layers):
        p = f"model.layers.{i}"
        for producer, consumers in ((f"{p}.input_layernorm.weight", ("self_attn.q_proj", "self_attn.k_proj",
                                                                      "self_attn.v_proj")),
                                    (f"{p}.post_attention_layernorm.weight", ("mlp.gate_proj", "mlp.up_proj")),
                                    (f"{p}.mlp.up_proj.weight", ("mlp.down_proj",))):
            names = [f"{p}.{c}" for c in consumers]
            x_max = calibration["absmax"][names[0]].clamp_min(1e-5)
            w_max = torch.stack([state[f"{n}.weight"].abs().amax(dim=0) for n in names]).amax(dim=0).clamp_min(1e-5)
            s = x_max.pow(alpha) / w_max.pow(1 - alpha)
            if producer.endswith("norm.weight"):
                state[producer] = state[producer] / s
            else:  # up_proj's output rows feed down_proj's input columns
                state[producer] = state[producer] / s[:, None]
            for n in names:
                state[f"{n}.weight"] = state[f"{n}.weight"] * s[None, :]
