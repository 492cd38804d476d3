"""Cache-aware scale-down's rule (cluster/scale_down.py), exactly, without Ray."""

import time

from fleetlm.cluster.router import pack_block_ids
from fleetlm.cluster.scale_down import choose_replicas_to_stop, removal_order, summary_blocks, unique_blocks


def _summary(ids):
    return {"v": 1, "t": time.time(), "num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0,
            "block_hash_ids": pack_block_ids(ids)}


def test_unique_blocks():
    caches = {"a": frozenset({1, 2, 3}), "b": frozenset({3, 4}), "c": frozenset({4})}
    assert unique_blocks(caches) == {"a": 2, "b": 0, "c": 0}
    assert unique_blocks({}) == {}


def test_removal_order_least_unique_first_then_fewest_then_rays_choice():
    hot = frozenset(range(100))            # a tenant's long system prompt, only here
    dup = frozenset(range(200, 260))       # cached on two replicas: losing one copy costs nothing
    caches = {"hot": hot, "dup1": dup | {900}, "dup2": dup, "empty": frozenset(), "new": None}
    order = removal_order(caches, preferred=["hot", "dup1"])
    # empty and new (never reported) hold nothing; dup2 holds only duplicated blocks (0 unique,
    # 60 cached); dup1 one unique block; hot 100.
    assert order == ["empty", "new", "dup2", "dup1", "hot"]
    # Ties on the cache: Ray's own preference, then the id.
    assert removal_order({"x": None, "y": None, "z": None}, preferred=["z", "x"]) == ["z", "x", "y"]
    # A replica on the head node goes last whatever it holds (Ray keeps the head too).
    assert removal_order({"h": frozenset(), "w": hot}, last=frozenset({"h"})) == ["w", "h"]


def test_summary_blocks_reads_only_fleetlm_summaries():
    assert summary_blocks(_summary([5, 7])) == frozenset({5, 7})
    assert summary_blocks(None) is None
    assert summary_blocks({}) is None
    assert summary_blocks({"v": 99}) is None
    assert summary_blocks({"v": 1, "block_hash_ids": b"garbage"}) is None  # no timestamp: no report


def test_choose_replicas_to_stop_swaps_only_running_replicas():
    running = ["old", "mid", "newest"]  # Ray stops the newest first
    stats = {"old": _summary(range(50)), "mid": _summary([1000]), "newest": _summary(range(500, 600))}
    # Ray would stop the newest, which holds 100 unique blocks; "mid" holds one.
    assert choose_replicas_to_stop({"newest"}, running, stats) == {"mid"}
    assert choose_replicas_to_stop({"newest", "mid"}, running, stats) == {"mid", "old"}
    # A pending replica Ray chose stays chosen; only the running part is re-ranked.
    assert choose_replicas_to_stop({"pending", "newest"}, running, stats) == {"pending", "mid"}
    assert choose_replicas_to_stop({"pending"}, running, stats) == {"pending"}
    # No FleetLM summaries (another kind of deployment): Ray's choice.
    assert choose_replicas_to_stop({"newest"}, running, {"old": {"x": 1}}) == {"newest"}
    # The head node's replica last.
    assert choose_replicas_to_stop({"newest"}, running, stats, on_head=frozenset({"mid"})) == {"old"}
