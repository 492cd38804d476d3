"""Hugging Face transformers as the numerical reference, built on FleetLM's own loaded weights.

Building the reference from the same tensors (rather than a second loader)
makes "same weights" literal; tests/integration/test_loader_hf.py checks
separately that those tensors equal transformers' own GGUF loading.
"""

from __future__ import annotations

import torch


def hf_model_from_source(source, dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fleetlm.workers.loader import iter_weights

    cfg = {k: v for k, v in source.hf_config.items() if k not in ("architectures", "quantization_config")}
    config = LlamaConfig(**cfg)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    state = {name: lazy.load().to(device=device, dtype=dtype) for name, lazy in iter_weights(source, device=device, dtype=dtype)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation and the log-softmax of each chosen token (raw logits)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_ids,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, lps
