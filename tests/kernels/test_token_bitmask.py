"""Grammar token bitmask: Triton vs torch reference, and the reference against a per-token loop."""

import pytest
import torch

from fleetlm.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref, unpack_token_bitmask

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here


def random_case(batch, vocab, rows, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen).to(dtype)
    words = -(-vocab // 32)
    # Random words over the full int32 range: the sign bit (token 31 of each word) is exercised too.
    bitmask = torch.randint(-(2**31), 2**31, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    return logits.to(device), torch.tensor(rows, dtype=torch.int64, device=device), bitmask.to(device)


def loop_reference(logits, rows, bitmask):
    out = logits.clone()
    for r, row in enumerate(rows.tolist()):
        for t in range(logits.shape[1]):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out


def test_reference_matches_a_per_token_loop():
    logits, rows, bitmask = random_case(5, 77, [4, 0, 2], torch.float32, "cpu")
    expected = loop_reference(logits, rows, bitmask)
    apply_token_bitmask_ref(logits, rows, bitmask)
    assert torch.equal(logits, expected)
    # Untouched rows stay bit-identical, and an all-ones word allows everything.
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[3]).all()


def test_unpack_orders_bits_little_endian_within_words():
    words = torch.tensor([[0b101, -(2**31)]], dtype=torch.int32)  # tokens 0, 2 and 63
    allowed = unpack_token_bitmask(words, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 63]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,vocab,rows", [(3, 33, [1]), (6, 4099, [5, 0, 3]), (1, 31, [0])])
def test_triton_matches_ref(device, dtype, batch, vocab, rows):
    logits, rows_t, bitmask = random_case(batch, vocab, rows, dtype, device, seed=vocab)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, rows_t, bitmask)
    apply_token_bitmask(logits, rows_t, bitmask)
    assert torch.equal(logits, expected)  # only -inf is written: exact


@requires_triton
def test_triton_strided_rows_and_no_rows(device):
    base = torch.randn(4, 200, device=device)
    logits = base[:, :130]  # row stride 200
    rows = torch.tensor([2, 0], dtype=torch.int64, device=device)
    bitmask = torch.zeros(2, 5, dtype=torch.int32, device=device)
    bitmask[:, 0] = 1  # only token 0
    expected = logits.clone()
    apply_token_bitmask_ref(expected, rows, bitmask)
    apply_token_bitmask(logits, rows, bitmask)
    assert torch.equal(logits, expected)
    assert torch.isinf(base[2, 1:130]).all() and torch.isfinite(base[2, 130:]).all()  # past V untouched
    before = logits.clone()
    apply_token_bitmask(logits, rows[:0], bitmask[:0])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("fn", [apply_token_bitmask, apply_token_bitmask_ref])
def test_launchers_reject_bad_inputs(fn):
    logits = torch.randn(2, 40)
    rows = torch.tensor([0], dtype=torch.int64)
    good = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"int32 \[1, 2\]"):
        fn(logits, rows, torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        fn(logits, rows, good.to(torch.int64))
    with pytest.raises(ValueError, match="int64"):
        fn(logits, rows.to(torch.int32), good)
    with pytest.raises(ValueError, match="unit-stride"):
        fn(torch.randn(40, 2).t(), rows, good)
    with pytest.raises(ValueError, match="dtype"):
        fn(logits.double(), rows, good)
