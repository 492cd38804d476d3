"""Rejection sampling and acceptance counting (workers/spec_verify.py), on synthetic distributions.

The chi-square tests draw many proposals from a draft distribution q, verify
them against a target p, and check the output tokens follow p, not q (a
control applies the same test against q and must reject it).
"""

from __future__ import annotations

import pytest
import torch

from fleetlm.workers.spec_verify import NO_PROPOSAL, num_accepted, proposal_rows, rejection_sample


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """P-value of Pearson's chi-square goodness of fit (cells with expected counts >= 5)."""
    keep = expected >= 5
    stat = (((observed - expected) ** 2) / expected)[keep].sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _case(vocab=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    return p, q


@pytest.mark.parametrize("seeded", [False, True])
def test_rejection_sampling_follows_the_target(seeded):
    p, q = _case()
    n = 20000 if not seeded else 3000
    torch.manual_seed(1)
    x = torch.multinomial(q, n, replacement=True)
    seeds = list(range(n)) if seeded else [None] * n
    accepted, tokens = rejection_sample(p.expand(n, -1).clone(), q.expand(n, -1).clone(), x, seeds, [3] * n)
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert chi_square_p_value(counts, p.double() * n) > 1e-3
    assert chi_square_p_value(counts, q.double() * n) < 1e-6  # the test has power: q is not p
    # Accepted where x was kept: the rate is sum(min(p, q)) (= 1 - total variation).
    rate = float(accepted.double().mean())
    assert rate == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.02)
    assert torch.equal(tokens[accepted], x[accepted])


def test_seeded_rows_are_reproducible_and_depend_on_the_index():
    p, q = _case(seed=3)
    x = torch.multinomial(q, 64, replacement=True, generator=torch.Generator().manual_seed(0))
    args = (p.expand(64, -1).clone(), q.expand(64, -1).clone(), x, [7] * 64)
    a = rejection_sample(*args, list(range(64)))
    b = rejection_sample(*args, list(range(64)))
    c = rejection_sample(*args, list(range(1, 65)))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


def test_one_hot_distributions_reduce_to_comparison():
    # Greedy rows: p and q one-hot. A proposal equal to the target's argmax is kept; any other
    # is replaced by the argmax.
    vocab = 5
    p = torch.nn.functional.one_hot(torch.tensor([2, 2, 4]), vocab).float()
    x = torch.tensor([2, 3, 1])
    q = torch.nn.functional.one_hot(x, vocab).float()
    accepted, tokens = rejection_sample(p, q, x, [None, 5, None], [0, 0, 0])
    assert accepted.tolist() == [True, False, False] and tokens.tolist() == [2, 2, 4]


def test_identical_distributions_accept_everything():
    p, _ = _case()
    n = 2000
    x = torch.multinomial(p, n, replacement=True)
    accepted, tokens = rejection_sample(p.expand(n, -1).clone(), p.expand(n, -1).clone(), x, [None] * n, [0] * n)
    assert bool(accepted.all()) and torch.equal(tokens, x)


def test_rows_and_accepted_counts():
    rows, firsts = proposal_rows([[5, 6], [], [7, 8, 9]])
    assert rows.tolist() == [5, 6, NO_PROPOSAL, NO_PROPOSAL, 7, 8, 9, NO_PROPOSAL]
    assert firsts.tolist() == [0, 3, 4]
    flags = torch.tensor([True, False, True, True, True, True, False, True])
    counts = torch.tensor([2, 0, 3])
    firsts = torch.from_numpy(firsts)
    assert num_accepted(flags, firsts, counts, 3).tolist() == [1, 0, 2]
    assert num_accepted(torch.ones(8, dtype=torch.bool), firsts, counts, 3).tolist() == [2, 0, 3]
