"""KV block pool (engine/block_manager.py): allocation order, ref counts, prefix cache, LRU eviction.

Every test drives the pool by hand (the scheduler's role): ``get_computed_blocks`` +
``allocate_slots`` at admission, ``num_computed_tokens`` + ``cache_full_blocks`` after
a step, ``free_request`` at the end, and checks the invariants after each operation.
"""

from __future__ import annotations

import copy

import pytest

from fleetlm.engine.block_hash import hash_prompt_blocks
from fleetlm.engine.block_manager import BlockManager
from fleetlm.engine.request import Request
from fleetlm.engine.sampling_params import SamplingParams

BS = 4


def mkreq(rid: str, tokens: list[int], cache_key: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=16), BS, cache_key=cache_key)


def check(bm: BlockManager) -> None:
    bm.check_invariants()
    # Free queue layout: blocks without a hash first (reused first), cached ones behind.
    hashed = [bm.block_hash[b] is not None for b in bm.free]
    assert hashed == sorted(hashed), f"uncached blocks must precede cached ones in free: {list(bm.free)}"
    # `cached` maps only to blocks carrying that very hash.
    for h, b in bm.cached.items():
        assert bm.block_hash[b] == h
    assert len(bm.cached) == sum(h is not None for h in bm.block_hash)


def admit(bm: BlockManager, req: Request) -> list[int]:
    """Admission as the scheduler does it, for the whole remaining prompt; returns the hits."""
    hits = bm.get_computed_blocks(req)
    num_cached = len(hits) * BS
    assert bm.allocate_slots(req, req.num_tokens - num_cached, hits)
    req.num_computed_tokens = num_cached
    check(bm)
    return hits


def compute(bm: BlockManager, req: Request) -> None:
    """The step ran: every token of the request is now in the cache."""
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)
    check(bm)


def free(bm: BlockManager, req: Request) -> None:
    bm.free_request(req.request_id)
    check(bm)


def snapshot(bm: BlockManager):
    return (
        list(bm.free),
        list(bm.ref_cnt),
        list(bm.block_hash),
        dict(bm.cached),
        copy.deepcopy(bm.req_blocks),
        dict(bm.req_num_hashed),
    )


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# -- allocation ----------------------------------------------------------------


def test_needs_at_least_one_block():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, BS)


def test_fresh_pool_allocates_ids_in_order():
    bm = BlockManager(10, BS)
    check(bm)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    a = mkreq("a", toks(0, 10))
    assert admit(bm, a) == []
    assert bm.blocks_of("a") == [0, 1, 2]
    b = mkreq("b", toks(100, 5))
    assert admit(bm, b) == []
    assert bm.blocks_of("b") == [3, 4]
    assert bm.ref_cnt == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert list(bm.free) == [5, 6, 7, 8, 9]
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(0.5)
    assert bm.blocks_of("nobody") == []


def test_decode_takes_a_new_block_only_at_a_block_boundary():
    bm = BlockManager(8, BS)
    r = mkreq("r", toks(0, 6))
    assert bm.allocate_slots(r, 6)
    assert bm.blocks_of("r") == [0, 1]
    r.num_computed_tokens = 6
    r.append_token(50)  # 7 tokens
    for expect in ([0, 1], [0, 1], [0, 1, 2], [0, 1, 2]):
        assert bm.allocate_slots(r, 1)
        check(bm)
        assert bm.blocks_of("r") == expect
        r.num_computed_tokens += 1
        r.append_token(50)
    # computed 10 tokens: 3 blocks, none of the others touched
    assert bm.num_free_blocks == 5


def test_chunked_allocation_grows_table_to_cover_computed_plus_new():
    bm = BlockManager(8, BS)
    r = mkreq("r", toks(0, 20))
    assert bm.allocate_slots(r, 7)
    assert bm.blocks_of("r") == [0, 1]
    r.num_computed_tokens = 7
    assert bm.allocate_slots(r, 7)  # up to 14 tokens: 4 blocks
    assert bm.blocks_of("r") == [0, 1, 2, 3]
    r.num_computed_tokens = 14
    assert bm.allocate_slots(r, 2)  # 16 tokens: still 4 blocks
    assert bm.blocks_of("r") == [0, 1, 2, 3]
    check(bm)


def test_allocate_fails_without_side_effects_when_pool_is_short():
    bm = BlockManager(4, BS)
    a = mkreq("a", toks(0, 12))
    admit(bm, a)
    b = mkreq("b", toks(100, 5))  # needs 2 blocks, 1 free
    before = snapshot(bm)
    assert not bm.allocate_slots(b, 5)
    assert snapshot(bm) == before
    assert "b" not in bm.req_blocks
    check(bm)
    # A running request that cannot grow keeps its table untouched too.
    c = mkreq("c", toks(200, 4))
    admit(bm, c)
    compute(bm, c)
    c.append_token(1)
    before = snapshot(bm)
    assert not bm.allocate_slots(c, 1)
    assert snapshot(bm) == before
    assert bm.blocks_of("c") == [3]


# -- sharing and ref counts ------------------------------------------------------


def test_two_requests_share_cached_prefix_blocks_with_ref_counts():
    bm = BlockManager(10, BS)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    assert bm.blocks_of("a") == [0, 1, 2]
    compute(bm, a)
    # Only full blocks are cached: block 2 holds one token.
    assert bm.cached == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    assert bm.block_hash[2] is None

    b = mkreq("b", toks(0, 8) + [77, 78])
    assert admit(bm, b) == [0, 1]
    assert b.num_computed_tokens == 8
    assert bm.blocks_of("b") == [0, 1, 3]
    assert bm.ref_cnt[:5] == [2, 2, 1, 1, 0]
    assert bm.usage == pytest.approx(0.4)

    free(bm, a)
    assert bm.ref_cnt[:5] == [1, 1, 0, 1, 0]
    assert list(bm.free) == [2, 4, 5, 6, 7, 8, 9]  # shared blocks stay out of the pool
    free(bm, b)
    assert bm.ref_cnt == [0] * 10
    # b's table [0, 1, 3]: 3 is uncached -> front; 1 then 0 appended (tail first).
    assert list(bm.free) == [3, 2, 4, 5, 6, 7, 8, 9, 1, 0]


def test_hit_on_a_block_referenced_by_a_running_request():
    bm = BlockManager(6, BS)
    a = mkreq("a", toks(0, 5))
    admit(bm, a)
    compute(bm, a)  # block 0 cached, still referenced by a
    b = mkreq("b", toks(0, 4) + [9])
    assert admit(bm, b) == [0]
    assert bm.ref_cnt[0] == 2
    assert bm.blocks_of("b") == [0, 2]
    c = mkreq("c", toks(0, 4) + [8, 8, 8, 8, 8])
    assert admit(bm, c) == [0]
    assert bm.ref_cnt[0] == 3
    assert bm.blocks_of("c") == [0, 3, 4]


def test_free_request_is_idempotent():
    bm = BlockManager(4, BS)
    a = mkreq("a", toks(0, 5))
    admit(bm, a)
    free(bm, a)
    before = snapshot(bm)
    free(bm, a)
    bm.free_request("never-seen")
    assert snapshot(bm) == before
    assert bm.ref_cnt == [0, 0, 0, 0]


# -- free order and eviction -----------------------------------------------------


def test_free_order_uncached_to_front_cached_tail_first():
    bm = BlockManager(8, BS)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    compute(bm, a)  # blocks 0, 1 cached; 2 not
    free(bm, a)
    assert list(bm.free) == [2, 3, 4, 5, 6, 7, 1, 0]
    # A new request reuses the uncached block first, then never-used ones, and
    # evicts the cached tail block (1) before the head block (0).
    c = mkreq("c", toks(500, 28))  # 7 blocks
    admit(bm, c)
    assert bm.blocks_of("c") == [2, 3, 4, 5, 6, 7, 1]
    assert bm.block_hash[1] is None
    assert bm.cached == {a.block_hashes[0]: 0}
    assert list(bm.free) == [0]


def test_uncached_blocks_are_reused_in_table_order():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a = mkreq("a", toks(0, 12))
    admit(bm, a)
    compute(bm, a)
    assert bm.cached == {}
    free(bm, a)
    assert list(bm.free) == [0, 1, 2, 3, 4, 5]
    b = mkreq("b", toks(50, 6))
    admit(bm, b)
    assert bm.blocks_of("b") == [0, 1]


def test_lru_eviction_order_of_cached_unreferenced_blocks():
    bm = BlockManager(6, BS)
    a = mkreq("a", toks(0, 9))
    b = mkreq("b", toks(100, 9))
    admit(bm, a)
    admit(bm, b)
    compute(bm, a)
    compute(bm, b)
    assert bm.blocks_of("a") == [0, 1, 2] and bm.blocks_of("b") == [3, 4, 5]
    free(bm, a)
    free(bm, b)
    assert list(bm.free) == [5, 2, 1, 0, 4, 3]

    # Evict one block at a time with single-block requests; record what goes.
    evicted = []
    for i in range(6):
        cached_before = dict(bm.cached)
        r = mkreq(f"x{i}", toks(1000 + 10 * i, 3))
        admit(bm, r)
        (blk,) = bm.blocks_of(r.request_id)
        if blk in cached_before.values():
            evicted.append(blk)
    assert evicted == [1, 0, 4, 3]
    assert bm.cached == {}
    assert bm.num_free_blocks == 0


def test_a_hit_refreshes_lru_position():
    bm = BlockManager(6, BS)
    a = mkreq("a", toks(0, 5))
    b = mkreq("b", toks(100, 5))
    admit(bm, a)
    admit(bm, b)
    compute(bm, a)
    compute(bm, b)
    free(bm, a)
    free(bm, b)
    # a's cached block 0 was freed before b's block 2: LRU order 0, 2.
    assert list(bm.free) == [3, 1, 4, 5, 0, 2]
    a2 = mkreq("a2", toks(0, 4) + [42])
    assert admit(bm, a2) == [0]  # revived out of the free queue
    assert list(bm.free) == [1, 4, 5, 2]  # 0 revived, 3 taken fresh
    assert bm.blocks_of("a2") == [0, 3]
    free(bm, a2)
    # Now block 0 is the most recently freed: b's block 2 goes first.
    assert list(bm.free) == [3, 1, 4, 5, 2, 0]


def test_allocate_counts_revived_cached_blocks_against_the_pool():
    bm = BlockManager(4, BS)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    compute(bm, a)
    free(bm, a)
    assert list(bm.free) == [2, 3, 1, 0]
    # b hits blocks 0 and 1 (both sitting in free) and needs 3 fresh ones:
    # 4 free blocks, but 2 of them are the hits themselves -> only 2 available.
    b = mkreq("b", toks(0, 8) + toks(300, 9))
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    before = snapshot(bm)
    assert not bm.allocate_slots(b, b.num_tokens - 8, hits)
    assert snapshot(bm) == before, "a failed allocate_slots must leave the pool untouched"
    check(bm)
    # One block less of new tokens fits exactly.
    c = mkreq("c", toks(0, 8) + toks(300, 8))
    hits = bm.get_computed_blocks(c)
    assert hits == [0, 1]
    assert bm.allocate_slots(c, c.num_tokens - 8, hits)
    check(bm)
    assert bm.blocks_of("c") == [0, 1, 2, 3]
    assert bm.ref_cnt == [1, 1, 1, 1]
    assert bm.num_free_blocks == 0
    assert bm.usage == 1.0


# -- prefix cache lookups ----------------------------------------------------------


def test_cache_hit_never_covers_the_last_token():
    bm = BlockManager(12, BS)
    a = mkreq("a", toks(0, 12))  # exactly 3 full blocks
    assert admit(bm, a) == []
    compute(bm, a)
    assert bm.cached == {a.block_hashes[i]: i for i in range(3)}
    # Same 12-token prompt: 3 blocks cached, but only 2 may be hit.
    b = mkreq("b", toks(0, 12))
    assert admit(bm, b) == [0, 1]
    assert b.num_computed_tokens == 8
    assert bm.blocks_of("b") == [0, 1, 3]
    # 8 tokens: only 1 block may be hit; 13 tokens: all 3.
    c = mkreq("c", toks(0, 8))
    assert admit(bm, c) == [0]
    d = mkreq("d", toks(0, 13))
    assert admit(bm, d) == [0, 1, 2]
    assert d.num_computed_tokens == 12
    # A prompt shorter than a block never hits.
    e = mkreq("e", toks(0, 4))
    assert admit(bm, e) == []


def test_hit_stops_at_first_missing_block():
    bm = BlockManager(12, BS)
    a = mkreq("a", toks(0, 13))
    admit(bm, a)
    compute(bm, a)
    b = mkreq("b", toks(0, 4) + [99, 5, 6, 7] + toks(8, 5))  # differs in block 1
    assert admit(bm, b) == [0]


def test_extra_key_isolates_cached_blocks():
    bm = BlockManager(12, BS)
    a = mkreq("a", toks(0, 9), cache_key="lora-1")
    admit(bm, a)
    compute(bm, a)
    assert admit(bm, mkreq("b", toks(0, 9))) == []
    assert admit(bm, mkreq("c", toks(0, 9), cache_key="lora-2")) == []
    assert admit(bm, mkreq("d", toks(0, 9), cache_key="lora-1")) == [0, 1]


def test_queried_and_hit_token_stats():
    bm = BlockManager(12, BS)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    assert (bm.queried_tokens, bm.hit_tokens) == (9, 0)
    compute(bm, a)
    admit(bm, mkreq("b", toks(0, 10)))
    assert (bm.queried_tokens, bm.hit_tokens) == (19, 8)
    admit(bm, mkreq("c", toks(0, 4) + [0, 0]))
    assert (bm.queried_tokens, bm.hit_tokens) == (25, 12)


def test_prefix_caching_disabled_never_hits_nor_counts():
    bm = BlockManager(12, BS, enable_prefix_caching=False)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    compute(bm, a)
    assert bm.cached == {} and bm.block_hash == [None] * 12
    assert admit(bm, mkreq("b", toks(0, 9))) == []
    assert bm.blocks_of("b") == [3, 4, 5]
    assert (bm.queried_tokens, bm.hit_tokens) == (0, 0)


def test_decode_blocks_are_cached_once_computed():
    bm = BlockManager(8, BS)
    r = mkreq("r", toks(0, 6))
    admit(bm, r)
    compute(bm, r)
    assert set(bm.cached.values()) == {0}
    # Decode: tokens 7, 8 (the second completes block 1 but its K/V is not computed yet).
    for t in (60, 61):
        r.append_token(t)
        assert bm.allocate_slots(r, 1)
        assert set(bm.cached.values()) == {0}
        compute(bm, r)
    assert r.num_tokens == 8 and len(r.block_hashes) == 2
    assert bm.cached == {r.block_hashes[0]: 0, r.block_hashes[1]: 1}
    assert bm.req_num_hashed["r"] == 2
    # A request extending the generated text hits both blocks.
    s = mkreq("s", toks(0, 6) + [60, 61, 1])
    assert admit(bm, s) == [0, 1]


def test_partially_computed_blocks_are_not_cached():
    bm = BlockManager(8, BS)
    r = mkreq("r", toks(0, 12))
    assert bm.allocate_slots(r, 6)
    r.num_computed_tokens = 6
    bm.cache_full_blocks(r)
    check(bm)
    assert bm.cached == {r.block_hashes[0]: 0}
    assert bm.allocate_slots(r, 6)
    r.num_computed_tokens = 12
    bm.cache_full_blocks(r)
    check(bm)
    assert bm.cached == {r.block_hashes[i]: i for i in range(3)}


def test_identical_content_computed_concurrently_first_registration_wins():
    bm = BlockManager(10, BS)
    prompt = toks(0, 9)
    a = mkreq("a", prompt)
    b = mkreq("b", prompt)
    admit(bm, a)
    admit(bm, b)  # nothing cached yet: b gets its own blocks
    assert bm.blocks_of("a") == [0, 1, 2] and bm.blocks_of("b") == [3, 4, 5]
    compute(bm, b)  # b's step result is processed first
    compute(bm, a)
    assert bm.cached == {b.block_hashes[0]: 3, b.block_hashes[1]: 4}
    assert bm.block_hash[:6] == [None, None, None, b.block_hashes[0], b.block_hashes[1], None]

    # a's duplicates stay private; a's later full block still chains on the shared content.
    a.append_token(1)
    a.append_token(2)
    a.append_token(3)  # 12 tokens
    assert bm.allocate_slots(a, 3)
    compute(bm, a)
    assert bm.cached[a.block_hashes[2]] == 2
    c = mkreq("c", toks(0, 9) + [1, 2, 3, 4])
    assert admit(bm, c) == [3, 4, 2]

    free(bm, a)  # a's private duplicates 0, 1 hold nothing worth keeping
    assert list(bm.free)[:2] == [0, 1]
    assert bm.ref_cnt[:6] == [0, 0, 1, 2, 2, 1]


# -- usage, reset ---------------------------------------------------------------


def test_usage_counts_only_referenced_blocks():
    bm = BlockManager(8, BS)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    assert bm.usage == pytest.approx(3 / 8)
    compute(bm, a)
    free(bm, a)
    assert bm.usage == 0.0  # cached but unreferenced blocks count as free
    assert len(bm.cached) == 2 and bm.num_free_blocks == 8
    assert sorted(bm.cached_hashes()) == sorted(a.block_hashes[:2])


def test_reset_prefix_cache_drops_unreferenced_cached_blocks_only():
    bm = BlockManager(8, BS)
    a = mkreq("a", toks(0, 9))
    admit(bm, a)
    compute(bm, a)  # 0, 1 cached
    b = mkreq("b", toks(100, 5))
    admit(bm, b)
    compute(bm, b)  # 3 cached
    c = mkreq("c", toks(0, 5))
    assert admit(bm, c) == [0]  # 0 shared by a and c
    free(bm, a)  # 1 unreferenced cached, 0 still referenced by c
    free(bm, b)
    assert list(bm.free) == [4, 2, 6, 7, 1, 3]
    bm.reset_prefix_cache()
    check(bm)
    assert bm.cached == {a.block_hashes[0]: 0}
    assert bm.block_hash[1] is None and bm.block_hash[3] is None
    assert set(list(bm.free)[:2]) == {1, 3}
    assert sorted(bm.free) == [1, 2, 3, 4, 6, 7]
    # Evicted content is no longer hit; the referenced block still is.
    assert admit(bm, mkreq("d", toks(0, 9))) == [0]
    assert admit(bm, mkreq("e", toks(100, 5))) == []
