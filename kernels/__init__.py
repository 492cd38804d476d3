"""Device kernels behind one frozen namespace, chosen once per worker.

``select_ops(device)`` returns an :class:`Ops` whose fields are the Triton
launchers on CUDA (when triton imports) and the plain-torch references
everywhere else; both sides have the same signatures and semantics (see each
module's docstring and DESIGN.md, "kernels/")::

    ops = select_ops(torch.device("cuda"))
    out, residual = ops.fused_add_rms_norm(x, residual, weight, eps)
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fleetlm.kernels import activation, attention, gemv, kv_cache, lora, qlinear, quant, rmsnorm, rotary, token_bitmask, wq_linear

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


@dataclass(frozen=True)
class Ops:
    """The kernels a model runs, from one backend (``"triton"`` or ``"torch"``)."""

    backend: str
    linear: Callable[..., torch.Tensor]
    linear_silu_mul: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    store_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    # Weights kept quantized (AWQ, GPTQ, GGUF blocks): kernels/wq_linear.py.
    wq_linear: Callable[..., torch.Tensor]
    apply_token_bitmask: Callable[..., None]
    # W8A8 (kernels/quant.py, kernels/qlinear.py): activation quantization fused into its
    # producer, the 8-bit GEMV for one decode row, and the batched 8-bit matmul.
    quantize: Callable[..., quant.QuantizedActivation]
    rms_norm_quant: Callable[..., quant.QuantizedActivation]
    fused_add_rms_norm_quant: Callable[..., tuple[quant.QuantizedActivation, torch.Tensor]]
    silu_and_mul_quant: Callable[..., quant.QuantizedActivation]
    qgemv_applies: Callable[..., bool]
    qgemv: Callable[..., torch.Tensor]
    qgemv_silu_mul: Callable[..., torch.Tensor]
    scaled_mm: Callable[..., torch.Tensor]
    lora_shrink: Callable[..., torch.Tensor]
    lora_expand: Callable[..., torch.Tensor]


def select_ops(device: torch.device | str, use_triton: bool | None = None) -> Ops:
    """Pick the backend once: Triton on CUDA when importable, else torch references.

    ``use_triton=True`` forces Triton (e.g. CPU tensors under
    ``TRITON_INTERPRET=1`` in tests); ``False`` forces the references.
    """
    device = torch.device(device)
    if use_triton is None:
        use_triton = device.type == "cuda" and HAS_TRITON
    if use_triton and not HAS_TRITON:
        raise RuntimeError("use_triton=True but triton is not importable; install fleetlm[triton]")
    if use_triton:
        return Ops(
            backend="triton",
            linear=gemv.linear,
            linear_silu_mul=gemv.linear_silu_mul,
            rms_norm=rmsnorm.rms_norm,
            fused_add_rms_norm=rmsnorm.fused_add_rms_norm,
            rotary_embedding=rotary.rotary_embedding,
            silu_and_mul=activation.silu_and_mul,
            store_kv_cache=kv_cache.store_kv_cache,
            paged_attention=attention.paged_attention,
            wq_linear=wq_linear.wq_linear,
            apply_token_bitmask=token_bitmask.apply_token_bitmask,
            quantize=quant.quantize,
            rms_norm_quant=quant.rms_norm_quant,
            fused_add_rms_norm_quant=quant.fused_add_rms_norm_quant,
            silu_and_mul_quant=quant.silu_and_mul_quant,
            qgemv_applies=qlinear.qgemv_applies,
            qgemv=qlinear.qgemv,
            qgemv_silu_mul=qlinear.qgemv_silu_mul,
            scaled_mm=qlinear.scaled_mm,
            lora_shrink=lora.lora_shrink,
            lora_expand=lora.lora_expand,
        )
    return Ops(
        backend="torch",
        linear=gemv.linear_ref,
        linear_silu_mul=gemv.linear_silu_mul_ref,
        rms_norm=rmsnorm.rms_norm_ref,
        fused_add_rms_norm=rmsnorm.fused_add_rms_norm_ref,
        rotary_embedding=rotary.rotary_embedding_ref,
        silu_and_mul=activation.silu_and_mul_ref,
        store_kv_cache=kv_cache.store_kv_cache_ref,
        paged_attention=attention.paged_attention_ref,
        wq_linear=wq_linear.wq_linear_ref,
        apply_token_bitmask=token_bitmask.apply_token_bitmask_ref,
        quantize=quant.quantize_ref,
        rms_norm_quant=quant.rms_norm_quant_ref,
        fused_add_rms_norm_quant=quant.fused_add_rms_norm_quant_ref,
        silu_and_mul_quant=quant.silu_and_mul_quant_ref,
        qgemv_applies=qlinear.qgemv_applies_ref,
        qgemv=qlinear.qgemv_ref,
        qgemv_silu_mul=qlinear.qgemv_silu_mul_ref,
        # The quantized path itself, in torch ops (kernels/qlinear.py: scaled_mm_ref's CPU branch).
        scaled_mm=qlinear.scaled_mm_ref,
        lora_shrink=lora.lora_shrink_ref,
        lora_expand=lora.lora_expand_ref,
    )


__all__ = ["HAS_TRITON", "Ops", "select_ops"]
