"""The sampler under a grammar's token bitmask: constrained rows sample only allowed tokens,
others are untouched, logprobs are those of the masked distribution, and min_tokens bans
never leave a constrained row with nothing."""

import torch

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.kernels.token_bitmask import apply_token_bitmask_ref
from fleetlm.workers.sampler import Sampler, SamplingBatch, SamplingRow

V = 70  # three mask words, the last one partial
sampler = Sampler(apply_token_bitmask_ref)


def mask_of(allowed_per_row: list[list[int]]) -> torch.Tensor:
    words = torch.zeros(len(allowed_per_row), -(-V // 32), dtype=torch.int64)
    for r, allowed in enumerate(allowed_per_row):
        for t in allowed:
            words[r, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def guided_batch(rows: list[SamplingRow], guided: dict[int, list[int]]) -> SamplingBatch:
    b = SamplingBatch.build(rows, "cpu")
    b.guided_rows = sorted(guided)
    b.bitmask_rows = torch.tensor(b.guided_rows, dtype=torch.int64)
    b.token_bitmask = mask_of([guided[r] for r in b.guided_rows])
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
    plain = sampler(x, SamplingBatch.build(rows, "cpu")).sampled_token_ids
    empty = guided_batch(rows, {})  # a grammar over no row
    assert torch.equal(sampler(x, empty).sampled_token_ids, plain)
