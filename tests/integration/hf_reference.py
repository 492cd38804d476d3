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


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation of one prompt alone (no padding) and the log-softmax of each chosen token (raw logits)."""
    return hf_greedy_batch(model, [prompt_ids], max_new_tokens, eos_token_ids)[0]


@torch.inference_mode()
def hf_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: list[int] | None,
                    group: int = 8) -> list[tuple[list[int], list[float]]]:
    """``hf_greedy`` of every prompt, run as left-padded batches of up to ``group`` prompts of
    similar lengths: decoding on CPU reads every weight once per step, so a batch of 8 costs
    about what one prompt does. ``eos_token_ids`` empty or None: all ``max_new_tokens``.

    The padded positions are masked out, so each row attends to its own tokens only; its
    logits differ from the unbatched run's in the last bits (other matmul blockings). The
    tests that use it compare greedy tokens, which such differences leave alone unless two
    logits tie to ~1e-6; ``test_engine_hf`` checks both forms agree on its prompts.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches, cur = [], []
    for i in order:  # similar lengths together: padding costs prefill compute
        if cur and (len(cur) == group or len(prompts[i]) > 2 * len(prompts[cur[0]]) + 16):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    eos = list(eos_token_ids or [])
    saved = model.generation_config.eos_token_id
    if not eos:
        model.generation_config.eos_token_id = None
    try:
        results: list = [None] * len(prompts)
        for batch in batches:
            width = max(len(prompts[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=model.device)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            for row, i in enumerate(batch):
                tokens = out.sequences[row, width:].tolist()
                # A finished row is padded while the others go on: cut after its first EOS.
                end = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
                tokens = tokens[:end]
                lps = [torch.log_softmax(out.logits[j][row].float(), -1)[t].item() for j, t in enumerate(tokens)]
                results[i] = (tokens, lps)
        return results
    finally:
        model.generation_config.eos_token_id = saved
