"""PEFT adapters for the embedded model, made by ``peft`` itself (``save_pretrained``), with random non-zero A and B.

PEFT initializes B to zero (an adapter that changes nothing); these tests need
adapters that change the model's tokens, so A and B are redrawn: A ~ N(0,
1/in), B ~ N(0, sigma), large enough to move greedy choices, small enough
that the text stays text.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    r: int
    alpha: float
    targets: list[str] = field(default_factory=lambda: list(ALL))
    rslora: bool = False
    sigma: float = 0.02
    seed: int = 0


RECIPES = [
    AdapterRecipe("all7-r8", r=8, alpha=16, seed=1),
    AdapterRecipe("qv-r4-rslora", r=4, alpha=8, targets=["q_proj", "v_proj"], rslora=True, sigma=0.05, seed=2),
    AdapterRecipe("mlp-o-r16", r=16, alpha=16, targets=["o_proj", "gate_proj", "down_proj"], seed=3),
]


def make_peft_model(hf_model, recipes: list[AdapterRecipe], out_dir) -> tuple[object, dict[str, str]]:
    """A PeftModel over ``hf_model`` holding every recipe's adapter; each saved under ``out_dir/<name>``."""
    from peft import LoraConfig, get_peft_model

    model = None
    paths = {}
    for rec in recipes:
        cfg = LoraConfig(r=rec.r, lora_alpha=rec.alpha, target_modules=rec.targets, use_rslora=rec.rslora,
                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        if model is None:
            model = get_peft_model(hf_model, cfg, adapter_name=rec.name)
        else:
            model.add_adapter(rec.name, cfg)
        gen = torch.Generator().manual_seed(rec.seed)
        for module in model.modules():
            if hasattr(module, "lora_A") and rec.name in module.lora_A:
                a, b = module.lora_A[rec.name].weight, module.lora_B[rec.name].weight
                with torch.no_grad():
                    a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=gen) * rec.sigma)
        path = out_dir / rec.name
        model.save_pretrained(str(path), selected_adapters=[rec.name])
        # save_pretrained puts a non-default adapter in a subdirectory named after it.
        nested = path / rec.name
        paths[rec.name] = str(nested if nested.is_dir() else path)
    model.eval()
    return model, paths


def peft_greedy(model, adapter: str | None, prompts: list[list[int]], max_new_tokens: int, eos_token_ids):
    """Greedy tokens of each prompt on the PeftModel with ``adapter`` active (None: the base model),
    batched (``hf_reference.hf_greedy_batch``)."""
    from hf_reference import hf_greedy_batch

    if adapter is not None:
        model.set_adapter(adapter)
    with model.disable_adapter() if adapter is None else contextlib.nullcontext():
        return [t for t, _ in hf_greedy_batch(model, prompts, max_new_tokens, eos_token_ids)]
