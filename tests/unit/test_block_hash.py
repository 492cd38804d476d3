"""Chained prefix-block hashes (engine/block_hash.py): the prefix cache's and the router's identity of a block."""

from __future__ import annotations

import hashlib
import struct

import pytest

from fleetlm.engine.block_hash import block_hash_id, hash_block, hash_prompt_blocks

BS = 4


def _sha(parent: bytes | None, tokens: list[int], extra: str | None = None) -> bytes:
    """The documented wire format, written out independently of the module."""
    h = hashlib.sha256(parent if parent is not None else b"\x00" * 32)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    if extra is not None:
        h.update(b"\xff" + extra.encode())
    return h.digest()


def test_one_block_matches_the_documented_format():
    (h,) = hash_prompt_blocks([1, 2, 3, 4], BS)
    assert h == _sha(None, [1, 2, 3, 4])
    assert len(h) == 32
    assert h.hex() == "ffb37f396c221c1e32e2d90de01d531aa5e704f43017ac4142d39b24fe4d6c58"


def test_chain_matches_the_documented_format_with_extra_key():
    hs = hash_prompt_blocks([1, 2, 3, 4, 5, 6, 7, 8], BS, extra_key="lora-a")
    h0 = _sha(None, [1, 2, 3, 4], "lora-a")
    h1 = _sha(h0, [5, 6, 7, 8], "lora-a")
    assert hs == [h0, h1]


def test_hash_block_chains_through_parent():
    h0 = hash_block(None, [1, 2, 3, 4])
    h1 = hash_block(h0, [5, 6, 7, 8])
    assert hash_prompt_blocks(list(range(1, 9)), BS) == [h0, h1]
    # Same tokens under another parent: another block.
    assert hash_block(None, [5, 6, 7, 8]) != h1


def test_same_prefix_gives_same_leading_hashes():
    a = hash_prompt_blocks(list(range(12)) + [100, 101, 102, 103], BS)
    b = hash_prompt_blocks(list(range(12)) + [200, 201, 202, 203], BS)
    assert len(a) == len(b) == 4
    assert a[:3] == b[:3]
    assert a[3] != b[3]


@pytest.mark.parametrize("pos", [0, 3, 5, 11])
def test_changed_token_changes_its_block_and_every_later_one(pos):
    base = list(range(16))
    other = list(base)
    other[pos] = 999
    a = hash_prompt_blocks(base, BS)
    b = hash_prompt_blocks(other, BS)
    blk = pos // BS
    assert a[:blk] == b[:blk]
    for i in range(blk, 4):
        assert a[i] != b[i], f"block {i} must change when token {pos} (block {blk}) changes"


def test_partial_tail_block_is_not_hashed():
    assert hash_prompt_blocks([], BS) == []
    assert hash_prompt_blocks([1, 2, 3], BS) == []
    assert len(hash_prompt_blocks(list(range(4)), BS)) == 1
    assert len(hash_prompt_blocks(list(range(7)), BS)) == 1
    assert len(hash_prompt_blocks(list(range(8)), BS)) == 2
    assert len(hash_prompt_blocks(list(range(9)), BS)) == 2
    # The tail does not influence the full blocks' hashes.
    assert hash_prompt_blocks(list(range(9)), BS) == hash_prompt_blocks(list(range(8)), BS)


def test_extra_key_separates_tenants_and_adapters():
    toks = list(range(8))
    plain = hash_prompt_blocks(toks, BS)
    a = hash_prompt_blocks(toks, BS, extra_key="adapter-a")
    b = hash_prompt_blocks(toks, BS, extra_key="adapter-b")
    empty = hash_prompt_blocks(toks, BS, extra_key="")
    assert len({plain[0], a[0], b[0], empty[0]}) == 4
    assert len({plain[1], a[1], b[1], empty[1]}) == 4
    assert hash_prompt_blocks(toks, BS, extra_key="adapter-a") == a  # deterministic


@pytest.mark.parametrize("split", [0, 4, 8, 12])
def test_continuation_equals_one_shot(split):
    toks = [7 * i % 13 for i in range(15)]
    full = hash_prompt_blocks(toks, BS, extra_key="k")
    head = hash_prompt_blocks(toks[:split], BS, extra_key="k")
    parent = head[-1] if head else None
    tail = hash_prompt_blocks(toks, BS, extra_key="k", parent=parent, start=split)
    assert head + tail == full
    assert len(full) == 3


def test_block_size_changes_the_blocks():
    toks = list(range(8))
    assert hash_prompt_blocks(toks, 8) != hash_prompt_blocks(toks, 4)[1:]
    assert len(hash_prompt_blocks(toks, 8)) == 1


def test_block_hash_id_is_63_bit_and_stable():
    (h,) = hash_prompt_blocks([1, 2, 3, 4], BS)
    assert block_hash_id(h) == int.from_bytes(h[:8], "little") >> 1
    assert block_hash_id(h) == 1084823484351109631  # golden: routers and replicas must agree
    hs = hash_prompt_blocks([1, 2, 3, 4, 5, 6, 7, 8], BS, extra_key="lora-a")
    assert [block_hash_id(x) for x in hs] == [3389237232081884970, 4177101801159993273]
    assert block_hash_id(b"\xff" * 32) == (1 << 63) - 1
    assert block_hash_id(b"\x00" * 32) == 0
    for i in range(200):
        v = block_hash_id(hash_block(None, [i] * BS))
        assert 0 <= v < 1 << 63
