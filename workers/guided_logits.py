"""The logits-processing step of structured output: grammar masks applied before the sampler.

A step with constrained rows (``engine/step.py``'s ``GrammarBitmask``) runs
this between the logits and the sampler: each constrained row's disallowed
tokens become -inf (``kernels/token_bitmask.py``, on the device, without a
host sync). Everything after it, the sampler and speculative decoding's
verification alike, sees only what the grammar allows, so a proposal the
grammar forbids can never be accepted. Logprobs are those of the masked
distribution, as in vLLM. Steps without constrained rows never come here.

A constrained row's bans (``min_tokens`` banning EOS and the stop token
ids) are applied here too, after the mask, and only where they leave the
row something: a grammar that can only end (it allows nothing but EOS)
ends the output, ``min_tokens`` or not. The sampler then skips those rows'
bans (their ``banned_token_ids`` are emptied), so nothing is applied twice.
"""

from __future__ import annotations

import torch

from fleetlm.workers.sampler import SamplingBatch, _to_device


def constrain_logits(logits: torch.Tensor, batch: SamplingBatch, rows: list[int], rows_d: torch.Tensor,
                     bitmask: torch.Tensor, apply_token_bitmask) -> torch.Tensor:
    """A float32 copy of ``logits [B, V]`` with ``rows`` (``rows_d`` on the device) masked by
    ``bitmask [len(rows), ceil(V/32)]`` and those rows' bans applied as described above."""
    logits = logits.to(torch.float32, copy=True)  # the caller's tensor stays intact
    apply_token_bitmask(logits, rows_d, bitmask)
    banned = [(r, batch.banned_token_ids[r]) for r in rows if batch.banned_token_ids[r]]
    if banned:
        dev = logits.device
        which = _to_device([r for r, _ in banned], torch.int64, dev)
        masked = logits.index_select(0, which)
        cols = [(i, t) for i, (_, ids) in enumerate(banned) for t in ids]
        index = (_to_device([i for i, _ in cols], torch.int64, dev), _to_device([t for _, t in cols], torch.int64, dev))
        with_bans = masked.index_put(index, torch.full((len(cols),), float("-inf"), device=dev))
        nothing_left = torch.isneginf(with_bans).all(dim=-1, keepdim=True)
        logits.index_copy_(0, which, torch.where(nothing_left, masked, with_bans))
        for r, _ in banned:
            batch.banned_token_ids[r] = []
    return logits
