import pytest
import torch

from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.workers.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    min_tokens_banned_ids,
    step_seed,
)

V = 64
sampler = Sampler()


def row(prompt=(), output=(), banned=(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), list(banned))


def batch(*rows) -> SamplingBatch:
    return SamplingBatch.build(list(rows), "cpu")


def rand_logits(b, v=V, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_build_flags_and_tensors():
    b = batch(row(temperature=0), row(temperature=0.5, top_k=-1, top_p=0.9, seed=3, output=[1, 2]))
    assert b.temperature.tolist() == [0.0, 0.5]
    assert b.top_k.dtype == torch.int32 and b.top_k.tolist() == [0, 0]
    assert b.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert b.seeds == [None, 3] and b.seed_offsets == [0, 2]
    assert (b.all_greedy, b.all_random, b.no_penalties) == (False, False, True)
    assert (b.no_top_k, b.no_top_p, b.no_min_p) == (True, False, True)
    assert b.num_logprobs == [None, None]


def test_greedy_is_argmax_and_logits_untouched():
    logits = rand_logits(5)
    before = logits.clone()
    out = sampler(logits, batch(*[row(temperature=0) for _ in range(5)]))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None
    assert torch.equal(logits, before)


def test_greedy_ties_pick_lowest_id():
    logits = torch.zeros(1, V)
    logits[0, [7, 3, 40]] = 5.0
    assert sampler(logits, batch(row(temperature=0))).sampled_token_ids.tolist() == [3]


def test_greedy_rows_exact_in_mixed_batch_with_penalties():
    logits = rand_logits(3)
    b = batch(
        row(temperature=0, output=[1, 2]),
        row(temperature=1.0, repetition_penalty=1.5, frequency_penalty=1.0, output=[int(logits[1].argmax())]),
        row(temperature=0, prompt=[int(logits[2].argmax())]),
    )
    out = sampler(logits, b).sampled_token_ids
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_degenerate_filters_equal_greedy(kw):
    logits = rand_logits(16, seed=1)
    rows = [row(temperature=1.3, **kw) for _ in range(16)]
    for _ in range(3):
        assert torch.equal(sampler(logits, batch(*rows)).sampled_token_ids, logits.argmax(-1))


def test_top_k_restricts_to_k_best():
    logits = rand_logits(1).expand(4000, V).contiguous()
    out = sampler(logits, batch(*[row(temperature=5.0, top_k=3)] * 4000)).sampled_token_ids
    assert set(out.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4).contiguous()
    out = sampler(logits, batch(*[row(top_p=0.7)] * 4000)).sampled_token_ids
    assert set(out.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log().expand(4000, 5).contiguous()
    out = sampler(logits, batch(*[row(min_p=0.3)] * 4000)).sampled_token_ids
    assert set(out.tolist()) == {0, 1, 2}  # threshold 0.12


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -2.0, 1.0, 3.0], [2.0, -1.0, 0.5, -2.0, 1.0, 3.0]])
    b = batch(
        row(prompt=[0, 1], output=[2, 2, 3], repetition_penalty=2.0, frequency_penalty=0.5,
            presence_penalty=0.25),
        row(prompt=[0, 1], output=[2, 2, 3]),
    )
    got = apply_penalties(logits.clone(), b)
    # 0: seen in prompt, positive -> /2; 1: prompt, negative -> *2;
    # 2: output x2 -> 0.5/2 - 0.5*2 - 0.25; 3: output x1 -> -2*2 - 0.5 - 0.25.
    assert got[0].tolist() == [1.0, -2.0, -1.0, -4.75, 1.0, 3.0]
    assert torch.equal(got[1], logits[1])  # neutral row unchanged bit for bit


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 3.0, 2.5]])
    presence = batch(row(temperature=0, output=[1], presence_penalty=1.0))
    repetition = batch(row(temperature=0, prompt=[1], repetition_penalty=1.3))
    assert sampler(logits, presence).sampled_token_ids.tolist() == [2]
    assert sampler(logits, repetition).sampled_token_ids.tolist() == [2]


def test_logit_bias():
    logits = torch.zeros(2, V)
    b = batch(row(temperature=0, logit_bias={17: 5.0}), row(temperature=0.8, logit_bias={5: 100, 6: -100}))
    assert sampler(logits, b).sampled_token_ids.tolist() == [17, 5]


def test_banned_tokens_never_sampled():
    logits = torch.zeros(600, 8)
    logits[:, 2] = 50.0
    logits[:, 5] = 49.0
    rows = [row(temperature=0.0 if i % 2 else 2.0, banned=[2, 5]) for i in range(600)]
    out = sampler(logits, batch(*rows)).sampled_token_ids
    assert not ((out == 2) | (out == 5)).any()
    # Banning wins over a positive logit_bias.
    b = batch(row(temperature=0, banned=[1], logit_bias={1: 100}))
    assert sampler(torch.zeros(1, 4), b).sampled_token_ids.tolist() == [0]


def test_min_tokens_banned_ids():
    p = SamplingParams(min_tokens=2, stop_token_ids=[7])
    assert min_tokens_banned_ids(p, 1, [2]) == [2, 7]
    assert min_tokens_banned_ids(p, 2, [2]) == []
    assert min_tokens_banned_ids(SamplingParams(min_tokens=2, ignore_eos=True), 0, [2]) == []


def test_seeded_independent_of_batch_composition_and_order():
    logits = torch.zeros(1, 1000)  # uniform: any dependence on the batch would show
    target = dict(temperature=1.0, seed=1234)
    for offset in range(5):
        out = [3] * offset
        alone = sampler(logits, batch(row(output=out, **target))).sampled_token_ids.item()
        mixed_rows = [row(), row(seed=7, output=[1]), row(output=out, **target), row(temperature=0)]
        mixed = sampler(logits.expand(4, 1000), batch(*mixed_rows)).sampled_token_ids[2].item()
        reordered = sampler(logits.expand(4, 1000), batch(*reversed(mixed_rows))).sampled_token_ids[1].item()
        assert alone == mixed == reordered
    # Different offsets (steps) and seeds draw differently.
    draws = {sampler(logits, batch(row(output=[0] * k, seed=1234))).sampled_token_ids.item() for k in range(10)}
    assert len(draws) > 5
    assert step_seed(1, 0) != step_seed(0, 1) and step_seed(-1, 3) == step_seed(2**64 - 1, 3)


def test_temperature_frequencies_match_softmax():
    torch.manual_seed(0)
    base = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 20000
    for t in (0.5, 1.0, 2.0):
        out = sampler(base.expand(n, 4).contiguous(), batch(*[row(temperature=t)] * n))
        freq = torch.bincount(out.sampled_token_ids, minlength=4).float() / n
        expected = torch.softmax(base / t, -1)
        assert torch.allclose(freq, expected, atol=0.015), (t, freq, expected)


def test_seeded_rows_sample_the_distribution():
    base = torch.tensor([2.0, 1.0, 0.0])
    n = 6000
    out = sampler(base.expand(n, 3).contiguous(), batch(*[row(seed=s) for s in range(n)]))
    freq = torch.bincount(out.sampled_token_ids, minlength=3).float() / n
    assert torch.allclose(freq, torch.softmax(base, -1), atol=0.02)


def test_logprobs_are_raw_and_ranks_correct():
    logits = rand_logits(3, seed=5)
    b = batch(
        row(temperature=0, logprobs=3, logit_bias={0: 100.0}),  # bias changes the pick, not the logprobs
        row(temperature=0.7, logprobs=1, repetition_penalty=1.7, output=[4]),
        row(temperature=0),
    )
    out = sampler(logits, b)
    raw = torch.log_softmax(logits, -1)
    assert out.logprob_token_ids.shape == (3, 4) and out.logprobs.shape == (3, 4)
    assert out.sampled_token_ids[0] == 0
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    assert torch.equal(out.logprob_token_ids[:, 1:], raw.topk(3, -1).indices)
    assert torch.equal(out.logprobs, raw.gather(-1, out.logprob_token_ids))
    for i in range(3):
        tok = out.sampled_token_ids[i]
        assert out.sampled_ranks[i].item() == 1 + int((raw[i] > raw[i, tok]).sum())
    assert out.sampled_ranks[2].item() == 1


def test_logprobs_zero_alternatives():
    logits = rand_logits(2)
    out = sampler(logits, batch(row(temperature=0, logprobs=0), row(temperature=0)))
    assert out.logprob_token_ids.shape == (2, 1)
    expected = torch.log_softmax(logits, -1).gather(-1, logits.argmax(-1, keepdim=True))
    assert torch.equal(out.logprobs, expected)
    assert out.sampled_ranks.tolist() == [1, 1]
