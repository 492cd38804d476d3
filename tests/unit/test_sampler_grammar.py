"""The sampler behind the grammar step (workers/guided_logits.py): constrained rows sample only
allowed tokens, others are untouched, logprobs are those of the masked distribution, and
min_tokens bans never leave a constrained row with nothing."""

import torch

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.kernels.token_bitmask import apply_token_bitmask_ref
from fleetlm.workers.guided_logits import constrain_logits
from fleetlm.workers.sampler import Sampler, SamplingBatch, SamplingRow

V = 70  # three mask words, the last one partial


def sampler(logits: torch.Tensor, batch: SamplingBatch):
    """What the runner does for a step with constrained rows: the grammar step, then the sampler."""
    if batch.guided:
        rows = sorted(batch.guided)
        bitmask = mask_of([batch.guided[r] for r in rows])
        logits = constrain_logits(logits, batch, rows, torch.tensor(rows, dtype=torch.int64), bitmask,
                                  apply_token_bitmask_ref)
    return Sampler()(logits, batch)


def mask_of(allowed_per_row: list[list[int]]) -> torch.Tensor:
    words = torch.zeros(len(allowed_per_row), -(-V // 32), dtype=torch.int64)
    for r, allowed in enumerate(allowed_per_row):
        for t in allowed:
            words[r, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def guided_batch(rows: list[SamplingRow], guided: dict[int, list[int]]) -> SamplingBatch:
    b = SamplingBatch.build(rows, "cpu")
    b.guided = guided  # row -> allowed tokens (read by sampler() above)
    return b


def row(banned=(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), [], [], list(banned))


def logits(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_constrained_rows_take_the_best_allowed_token_and_others_are_free():
    x = logits(3)
    before = x.clone()
    allowed = {0: [5, 40, 69], 2: [33]}
    out = sampler(x, guided_batch([row(temperature=0) for _ in range(3)], allowed))
    ids = out.sampled_token_ids.tolist()
    assert ids[0] == max(allowed[0], key=lambda t: x[0, t].item())
    assert ids[1] == x[1].argmax().item()  # unconstrained row: plain argmax
    assert ids[2] == 33
    assert torch.equal(x, before)  # the caller's logits are not modified


def test_random_rows_sample_only_allowed_tokens():
    allowed = {0: [1, 2, 64], 1: list(range(0, V, 3))}
    for seed in range(20):
        b = guided_batch([row(temperature=1.5, top_p=0.9, seed=seed), row(temperature=0.7, top_k=5, seed=seed)],
                         allowed)
        ids = sampler(logits(2, seed), b).sampled_token_ids.tolist()
        assert ids[0] in allowed[0] and ids[1] in allowed[1]


def test_logprobs_are_of_the_masked_distribution():
    x = logits(1)
    allowed = [3, 9, 50]
    out = sampler(x, guided_batch([row(temperature=0, logprobs=4)], {0: allowed}))
    expected = torch.log_softmax(x[0, allowed], -1)
    top = out.logprob_token_ids[0, 1:4].tolist()
    assert sorted(top) == sorted(allowed)
    assert torch.isneginf(out.logprobs[0, 4])  # the 4th best is masked
    got = {t: out.logprobs[0, 1 + i].item() for i, t in enumerate(top)}
    for t, lp in zip(allowed, expected.tolist()):
        assert abs(got[t] - lp) < 1e-5


def test_min_tokens_bans_apply_unless_they_empty_a_constrained_row():
    x = logits(2)
    eos = 7
    # Row 0: the grammar allows EOS and 8; the ban on EOS leaves 8. Row 1: only EOS; the grammar wins.
    b = guided_batch([row(banned=[eos], temperature=0), row(banned=[eos], temperature=0)], {0: [eos, 8], 1: [eos]})
    assert sampler(x, b).sampled_token_ids.tolist() == [8, eos]


def test_unconstrained_batch_is_unchanged_by_the_grammar_path():
    x = logits(4, seed=3)
    rows = [row(temperature=0.8, seed=11 + i) for i in range(4)]
    plain = Sampler()(x, SamplingBatch.build(rows, "cpu")).sampled_token_ids
    b = SamplingBatch.build(rows, "cpu")
    everything = mask_of([list(range(V))])
    masked = constrain_logits(x, b, [2], torch.tensor([2]), everything, apply_token_bitmask_ref)
    assert torch.equal(Sampler()(masked, b).sampled_token_ids, plain)  # an all-allowed mask changes nothing


def test_bans_of_free_rows_stay_with_the_sampler():
    x = logits(2)
    b = guided_batch([row(banned=[3], temperature=0), row(banned=[4], temperature=0)], {1: list(range(V))})
    masked = constrain_logits(x, b, [1], torch.tensor([1]), mask_of([list(range(V))]), apply_token_bitmask_ref)
    assert b.banned_token_ids == [[3], []]  # row 1's ban was applied by the grammar step
    assert torch.isneginf(masked[1, 4]) and torch.isfinite(masked[0, 3])
