"""The prefix-aware routing policy, without Ray: exact choices on hand-built stats."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from fleetlm.cluster.router import (
    SUMMARY_MAX_BLOCKS,
    ReplicaStats,
    RouterConfig,
    RouterMemory,
    RoutingRequest,
    choose_replica,
    decide,
    matched_blocks,
    pack_block_ids,
    replica_load,
    request_block_hash_ids,
    routing_summary,
    select_summary_blocks,
    unpack_block_ids,
)

NOW = 1000.0
CFG = RouterConfig()  # stats_ttl_s=10, imbalance_abs=4, imbalance_ratio=2, memory_ttl_s=30
REQ = RoutingRequest((11, 12, 13, 14, 15, 16))


def rs(rid: str, blocks=(), running: int = 0, waiting: int = 0, t: float | None = NOW,
       ongoing: int | None = None) -> ReplicaStats:
    return ReplicaStats(rid, running, waiting, 0.0, frozenset(blocks), t, ongoing)


def mem(**kw) -> RouterMemory:
    return RouterMemory(**kw)


class FixedPair:
    """An rng whose power-of-two sample is known."""

    def __init__(self, pair):
        self.pair = list(pair)
        self.calls = []

    def sample(self, seq, k):
        self.calls.append((list(seq), k))
        return list(self.pair)


# --- longest prefix --------------------------------------------------------------------------


def test_longest_cached_prefix_wins():
    replicas = [rs("a", {11, 12}), rs("b", {11, 12, 13, 14}), rs("c")]
    d = decide(REQ, replicas, mem(), NOW)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("b", "prefix", 4)
    assert dict(d.loads) == {"a": 0, "b": 0, "c": 0}


def test_match_counts_leading_blocks_only():
    # c holds five of the six blocks but not the first: no prefix of the request.
    replicas = [rs("a", {11}), rs("c", {12, 13, 14, 15, 16})]
    assert matched_blocks(REQ, replicas[1], mem(), NOW, CFG) == 0
    assert matched_blocks(REQ, replicas[0], mem(), NOW, CFG) == 1
    assert choose_replica(REQ, replicas, mem(), NOW) == "a"


def test_longer_prefix_beats_lower_load_while_in_balance():
    # b: 4 blocks, load 4 = min_load + imbalance_abs exactly -> still in balance.
    replicas = [rs("a", {11}, running=0), rs("b", {11, 12, 13, 14}, running=3, waiting=1)]
    d = decide(REQ, replicas, mem(), NOW)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("b", "prefix", 4)


def test_full_match_whole_request():
    replicas = [rs("a", set(REQ.block_hash_ids)), rs("b", {11, 12})]
    assert decide(REQ, replicas, mem(), NOW).matched_blocks == 6


# --- imbalance fallback ---------------------------------------------------------------------


def test_imbalance_falls_back_to_power_of_two_choices():
    # b has the prefix but load 5 > 0 + 4 and 5 > 2 * 0: out of balance.
    replicas = [rs("a", running=0), rs("b", {11, 12, 13}, running=5)]
    d = decide(REQ, replicas, mem(), NOW)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("a", "imbalance", 0)


def test_imbalance_needs_both_the_absolute_and_the_relative_gap():
    # min load 10: b at 19 exceeds 10 + 4 but not 2 * 10 -> in balance, prefix wins.
    replicas = [rs("a", running=10), rs("b", {11, 12}, running=19)]
    assert decide(REQ, replicas, mem(), NOW).reason == "prefix"
    # b at 21 exceeds both -> imbalance.
    replicas = [rs("a", running=10), rs("b", {11, 12}, running=21)]
    assert decide(REQ, replicas, mem(), NOW).replica_id == "a"
    # Tighter knobs move the boundary.
    tight = RouterConfig(imbalance_abs=1, imbalance_ratio=1.0)
    replicas = [rs("a", running=1), rs("b", {11}, running=3)]
    assert decide(REQ, replicas, mem(), NOW, tight).reason == "imbalance"


def test_power_of_two_picks_the_less_loaded_of_the_sampled_pair():
    replicas = [rs("a", running=0), rs("b", {11, 12, 13}, running=9), rs("c", running=2), rs("d", running=1)]
    rng = FixedPair(["c", "b"])
    d = decide(REQ, replicas, mem(), NOW, rng=rng)
    assert (d.replica_id, d.reason) == ("c", "imbalance")  # not "a", the global minimum: p2c
    assert rng.calls == [(["a", "b", "c", "d"], 2)]
    # Equal loads in the pair: the smaller id.
    replicas = [rs("a"), rs("b", {11}, running=9), rs("c", running=2), rs("d", running=2)]
    assert decide(REQ, replicas, mem(), NOW, rng=FixedPair(["d", "c"])).replica_id == "c"


def test_power_of_two_without_rng_is_deterministic():
    replicas = [rs("a", running=1), rs("b", {11, 12}, running=9), rs("c", running=1), rs("d", running=3)]
    first = decide(REQ, replicas, mem(), NOW)
    assert first.reason == "imbalance"
    assert all(decide(REQ, replicas, mem(), NOW) == first for _ in range(5))


# --- ties ------------------------------------------------------------------------------------


def test_equal_match_ties_break_by_load_then_id():
    replicas = [rs("c", {11, 12}, running=1), rs("b", {11, 12}, running=2), rs("a", {11, 12}, running=1)]
    assert choose_replica(REQ, replicas, mem(), NOW) == "a"
    replicas = [rs("c", {11, 12}, running=0), rs("b", {11, 12}, running=2), rs("a", {11, 12}, running=1)]
    assert choose_replica(REQ, replicas, mem(), NOW) == "c"


def test_no_match_anywhere_goes_to_the_least_loaded():
    replicas = [rs("a", {99}, running=3), rs("b", running=1), rs("c", running=2)]
    d = decide(REQ, replicas, mem(), NOW)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("b", "least_loaded", 0)


def test_equal_load_ties_prefer_the_replica_given_fewer_blocks_then_id():
    m = mem()
    m.record("a", [1, 2, 3], NOW)
    m.record("b", [4], NOW)
    other = RoutingRequest((50, 51))
    assert choose_replica(other, [rs("a"), rs("b"), rs("c")], m, NOW) == "c"
    assert choose_replica(other, [rs("a"), rs("b")], m, NOW) == "b"
    # All equal: id.
    assert choose_replica(other, [rs("b"), rs("a")], mem(), NOW) == "a"


def test_empty_request_and_single_replica():
    assert decide(RoutingRequest(), [rs("a", running=2), rs("b", running=1)], mem(), NOW).replica_id == "b"
    assert decide(REQ, [rs("only", running=50)], mem(), NOW).replica_id == "only"


# --- stale stats ------------------------------------------------------------------------------


def test_stale_summary_is_no_prefix_info():
    stale = rs("b", {11, 12, 13, 14}, t=NOW - 10.5)
    fresh = rs("a", {11})
    d = decide(REQ, [fresh, stale], mem(), NOW)
    assert (d.replica_id, d.matched_blocks) == ("a", 1)
    assert matched_blocks(REQ, stale, mem(), NOW, CFG) == 0
    # Exactly at the TTL it still counts.
    assert matched_blocks(REQ, rs("b", {11, 12}, t=NOW - 10.0), mem(), NOW, CFG) == 2


def test_stale_stats_still_report_their_last_load():
    stale = rs("b", {11, 12}, running=7, t=NOW - 60)
    assert replica_load(stale, mem()) == 7
    assert choose_replica(REQ, [stale, rs("a", running=1)], mem(), NOW) == "a"


def test_never_reported_replica_has_no_info_and_only_inflight_load():
    m = mem()
    m.sent("r1", "new", NOW - 1)
    new = ReplicaStats("new")
    assert replica_load(new, m) == 1
    assert matched_blocks(REQ, new, m, NOW, CFG) == 0


# --- unknown replicas ---------------------------------------------------------------------------


def test_replicas_absent_from_the_candidates_are_ignored():
    m = mem()
    m.record("gone", REQ.block_hash_ids, NOW)  # remembered, but no longer a candidate
    d = decide(REQ, [rs("a", running=3), rs("b", running=1)], m, NOW)
    assert (d.replica_id, d.reason) == ("b", "least_loaded")
    assert set(d.loads) == {"a", "b"}


def test_duplicate_candidate_counts_once_first_wins():
    d = decide(REQ, [rs("a", {11, 12}), rs("a"), rs("b", {11})], mem(), NOW)
    assert (d.replica_id, d.matched_blocks) == ("a", 2)


def test_no_candidate_is_an_error():
    with pytest.raises(ValueError, match="no replica"):
        decide(REQ, [], mem(), NOW)


def test_malformed_or_foreign_summaries_count_as_no_report():
    assert ReplicaStats.from_summary("a", None) == ReplicaStats("a")
    assert ReplicaStats.from_summary("a", {}) == ReplicaStats("a")
    assert ReplicaStats.from_summary("a", {"v": 99, "t": NOW}) == ReplicaStats("a")
    assert ReplicaStats.from_summary("a", {"v": 1, "num_running": 2}) == ReplicaStats("a")  # no time
    assert ReplicaStats.from_summary("a", {"v": 1, "t": "x"}, num_ongoing=3) == ReplicaStats("a", num_ongoing=3)


# --- memory between stats updates --------------------------------------------------------------


def test_router_remembers_its_decisions_between_updates():
    m = mem()
    replicas = [rs("a", t=None), rs("b", t=None), rs("c", t=None)]
    first = choose_replica(REQ, replicas, m, NOW)
    assert first == "a"
    m.record(first, REQ.block_hash_ids, NOW)
    m.sent("r1", first, NOW)
    # Same tenant, longer prompt: follows the first one although nobody reported yet.
    follow = RoutingRequest(REQ.block_hash_ids + (17,))
    d = decide(follow, replicas, m, NOW + 1)
    assert (d.replica_id, d.reason, d.matched_blocks) == ("a", "prefix", 6)
    # The in-flight request counts as load on "a".
    assert dict(d.loads) == {"a": 1, "b": 0, "c": 0}
    # Memory expires after memory_ttl_s.
    assert decide(follow, replicas, m, NOW + 30.5).matched_blocks == 0


def test_inflight_counts_only_until_the_replica_reports_it():
    m = mem()
    m.sent("r1", "a", NOW)
    m.sent("r2", "a", NOW + 2)
    assert replica_load(rs("a", running=4, t=NOW - 1), m) == 6   # report predates both
    assert replica_load(rs("a", running=4, t=NOW + 1), m) == 5   # r1 already in the report
    assert replica_load(rs("a", running=4, t=NOW + 3), m) == 4
    m.complete("r2", "a")
    assert replica_load(rs("a", running=4, t=NOW - 1), m) == 5
    # Serve's live count, when the router has one, is the load.
    assert replica_load(rs("a", running=1, t=NOW - 1, ongoing=9), m) == 9
    assert replica_load(rs("a", running=5, t=NOW - 1, ongoing=2), m) == 2
    assert replica_load(rs("a", running=5, t=None, ongoing=0), m) == 0


def test_six_tenants_spread_two_per_replica_from_memory_alone():
    m = mem()
    replicas = [rs("a", t=None), rs("b", t=None), rs("c", t=None)]
    tenants = [RoutingRequest(tuple(range(100 * t, 100 * t + 25))) for t in range(6)]
    placed = {}
    for i, req in enumerate(tenants * 3):  # each request completes before the next
        rid = choose_replica(req, replicas, m, NOW + i)
        m.record(rid, req.block_hash_ids, NOW + i)
        m.sent(f"r{i}", rid, NOW + i)
        m.complete(f"r{i}", rid)
        placed.setdefault(req.block_hash_ids[0], set()).add(rid)
    assert placed == {0: {"a"}, 100: {"b"}, 200: {"c"}, 300: {"a"}, 400: {"b"}, 500: {"c"}}


# --- bounded memory -----------------------------------------------------------------------------


def test_block_memory_is_an_lru_bounded_by_max_blocks():
    m = RouterMemory(max_blocks=5)
    m.record("a", [1, 2, 3], NOW)
    m.record("b", [1, 2], NOW + 1)
    m.record("a", [1], NOW + 2)          # touch: (a, 1) becomes the newest
    m.record("b", [7, 8], NOW + 3)       # two over the bound: (a, 2), (a, 3) go
    assert len(m) == 5
    assert [h for h in (1, 2, 3) if m.has_block("a", h, NOW + 3)] == [1]
    assert [h for h in (1, 2, 7, 8) if m.has_block("b", h, NOW + 3)] == [1, 2, 7, 8]
    assert (m.num_blocks("a"), m.num_blocks("b")) == (1, 4)
    for i in range(1000):
        m.record("c", [10_000 + i], NOW + 4)
    assert len(m) == 5 and m.num_blocks("c") == 5 and m.num_blocks("a") == 0


def test_block_memory_expires_by_age():
    m = RouterMemory(ttl_s=30.0)
    m.record("a", [1, 2], NOW)
    m.record("a", [3], NOW + 20)
    assert m.has_block("a", 1, NOW + 30) and not m.has_block("a", 1, NOW + 30.01)
    m.expire(NOW + 31)
    assert len(m) == 1 and m.num_blocks("a") == 1 and m.has_block("a", 3, NOW + 31)


def test_inflight_memory_is_bounded_and_expires():
    m = RouterMemory(max_inflight=3, inflight_ttl_s=600.0)
    m.sent("r1", "a", NOW)
    m.sent("r2", "b", NOW + 1)
    m.sent("r3", "a", NOW + 2)
    m.sent("r4", "a", NOW + 3)                     # over the bound: r1 dropped
    assert m.num_inflight == 3
    assert (m.inflight_since("a", None), m.inflight_since("b", None)) == (2, 1)
    assert m.inflight_since("a", NOW + 2) == 1
    m.complete("r1", "a")                          # already dropped: ignored
    m.complete("r3", "b")                          # never sent there: ignored
    assert m.num_inflight == 3
    m.expire(NOW + 601.5)                          # r2 (sent at NOW + 1) is older than 600 s
    assert (m.num_inflight, m.inflight_since("b", None)) == (2, 0)
    m.complete("r3", "a")
    m.complete("r3", "a")                          # idempotent
    assert (m.num_inflight, m.inflight_since("a", None)) == (1, 1)


def test_subrequests_sharing_a_request_id_count_separately():
    # Serve gives the n prompts of one HTTP request the same internal request id.
    m = RouterMemory()
    m.sent("req", "a", NOW)
    m.sent("req", "a", NOW + 1)
    m.sent("req", "b", NOW + 1)
    assert (m.inflight_since("a", None), m.inflight_since("b", None), m.num_inflight) == (2, 1, 3)
    m.complete("req", "a")
    assert (m.inflight_since("a", None), m.inflight_since("a", NOW + 0.5)) == (1, 1)
    m.complete("req", "b")
    m.complete("req", "a")
    assert m.num_inflight == 0 and m.inflight_since("a", None) == 0


def test_forget_replica_drops_its_blocks_and_requests():
    m = RouterMemory()
    m.record("a", [1, 2], NOW)
    m.sent("r1", "a", NOW)
    m.record("b", [1], NOW)
    m.sent("r2", "b", NOW)
    m.forget_replica("a")
    assert len(m) == 1 and m.num_blocks("a") == 0 and m.num_inflight == 1
    assert not m.has_block("a", 1, NOW) and m.has_block("b", 1, NOW)
    assert m.inflight_since("a", None) == 0 and m.inflight_since("b", None) == 1


def test_memory_bound_holds_under_a_long_random_workload():
    m = RouterMemory(max_blocks=1000, max_inflight=50)
    rng = random.Random(7)
    for i in range(3000):
        ids = [rng.randrange(10_000) for _ in range(rng.randrange(1, 40))]
        rid = rng.choice("abcd")
        m.record(rid, ids, NOW + i * 0.001)
        m.sent(f"r{i % 97}", rid, NOW + i * 0.001)
        if rng.random() < 0.3:
            m.complete(f"r{rng.randrange(97)}", rng.choice("abcd"))
        assert len(m) <= 1000 and m.num_inflight <= 50
    assert sum(m.num_blocks(r) for r in "abcd") == len(m)
    assert sum(m.inflight_since(r, None) for r in "abcd") == m.num_inflight


# --- replica summary ---------------------------------------------------------------------------


def test_block_ids_pack_and_unpack():
    ids = [0, 1, (1 << 63) - 1, 123456789]
    packed = pack_block_ids(ids)
    assert len(packed) == 32
    assert list(unpack_block_ids(packed)) == ids
    assert list(unpack_block_ids(packed + b"\x01\x02")) == ids  # a torn tail is dropped


def test_summary_keeps_oldest_and_newest_halves():
    assert select_summary_blocks([1, 2, 3], 4) == [1, 2, 3]
    assert select_summary_blocks(list(range(10)), 4) == [0, 1, 8, 9]
    assert select_summary_blocks(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert select_summary_blocks(list(range(10)), 0) == []


def test_routing_summary_of_an_engine_is_bounded_and_parses_back():
    ids = list(range(1, 10_001))
    engine = SimpleNamespace(
        stats=lambda: SimpleNamespace(num_running=3, num_waiting=2, kv_cache_usage=0.5),
        cached_block_hash_ids=lambda: ids,
    )
    summary = routing_summary(engine)
    assert summary["num_running"] == 3 and summary["num_waiting"] == 2 and summary["kv_cache_usage"] == 0.5
    assert len(summary["block_hash_ids"]) == SUMMARY_MAX_BLOCKS * 8 == 32768
    stats = ReplicaStats.from_summary("r", summary, num_ongoing=4)
    assert len(stats.block_hash_ids) == SUMMARY_MAX_BLOCKS
    assert 1 in stats.block_hash_ids and 10_000 in stats.block_hash_ids and 5000 not in stats.block_hash_ids
    assert (stats.num_running, stats.num_waiting, stats.num_ongoing) == (3, 2, 4)
    assert stats.timestamp == summary["t"]


# --- request plumbing and config ------------------------------------------------------------------


def test_block_hash_ids_come_from_the_request_object_or_a_kwarg():
    req = SimpleNamespace(block_hash_ids=(5, 6))
    assert request_block_hash_ids([req], {}) == (5, 6)
    assert request_block_hash_ids([], {"req": req}) == (5, 6)
    assert request_block_hash_ids(["x"], {"block_hash_ids": [7]}) == (7,)
    assert request_block_hash_ids(["x"], {}) == ()
    assert request_block_hash_ids([SimpleNamespace(block_hash_ids="bad")], {}) == ()


def test_router_config_rejects_nonsense():
    with pytest.raises(ValueError, match="imbalance_ratio"):
        RouterConfig(imbalance_ratio=0.5)
    with pytest.raises(ValueError, match="stats_ttl_s"):
        RouterConfig(stats_ttl_s=0)
    with pytest.raises(ValueError, match="max_memory_blocks"):
        RouterConfig(max_memory_blocks=-1)
    with pytest.raises(TypeError):
        RouterConfig(unknown=1)


def test_importing_the_policy_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, fleetlm.cluster.router; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
