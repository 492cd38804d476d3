"""The KV block pool: allocation, reference counts and the prefix cache.

Invariants (checked by ``check_invariants``):
- every block is either referenced (``ref_cnt > 0``, owned by >= 1 request) or
  in ``free`` (``ref_cnt == 0``), never both;
- a block with a hash is in ``cached`` under that hash, and ``cached`` maps
  only to such blocks; blocks in ``free`` may still carry a hash: they are the
  unreferenced prefix cache, evicted LRU-first when a fresh block is needed;
- a request's block table covers ``ceil(num_tokens_in_cache / block_size)``
  blocks, shared prefix blocks first.

``free`` is ordered: blocks without a hash sit at the front (reused first, they
hold nothing worth keeping), cached ones behind them in least-recently-freed
order. Plain Python over ints: no torch here.
"""

from __future__ import annotations

from collections import OrderedDict

from fleetlm.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_hashed: dict[str, int] = {}  # leading blocks of the request already in `cached`
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached-but-unreferenced count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_of(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def cached_hashes(self) -> list[bytes]:
        return list(self.cached)

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks covering the longest prefix of ``req``'s full blocks.

        At least one token is always left to compute, since the step that
        computes the last token is the one that produces logits to sample from.
        """
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            # Prompt logprobs need logits at every prompt position: nothing may be skipped.
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in req.block_hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # -- allocation ----------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if the pool is short.

        ``computed_blocks`` (from ``get_computed_blocks``, only at admission)
        are shared into the request's table before fresh blocks are taken.
        """
        admitting = req.request_id not in self.req_blocks
        table = self.req_blocks.setdefault(req.request_id, [])
        num_cached_tokens = len(computed_blocks) * self.block_size
        need = cdiv(req.num_computed_tokens + num_cached_tokens + num_new_tokens, self.block_size)
        num_fresh = need - len(table) - len(computed_blocks)
        # Touching a cached block that sits in `free` takes it out of the pool.
        num_revived = sum(1 for b in computed_blocks if self.ref_cnt[b] == 0)
        if num_fresh > len(self.free) - num_revived:
            if not table:
                del self.req_blocks[req.request_id]
            return False
        for b in computed_blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1
        table.extend(computed_blocks)
        if admitting and self.enable_prefix_caching:
            # Counted once per admission (not per failed attempt while queued).
            self.queried_tokens += req.num_tokens
            self.hit_tokens += num_cached_tokens
        if computed_blocks:
            self.req_num_hashed[req.request_id] = len(table)
        for _ in range(max(num_fresh, 0)):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict from the prefix cache
                del self.cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            table.append(b)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self.req_blocks.get(req.request_id, [])
        done = self.req_num_hashed.get(req.request_id, 0)
        upto = min(req.num_computed_tokens // self.block_size, len(req.block_hashes), len(table))
        for i in range(done, upto):
            h = req.block_hashes[i]
            b = table[i]
            # Another request may have computed the same content at the same
            # time: the first registration wins, this block stays private.
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h
        self.req_num_hashed[req.request_id] = max(done, upto)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Give back the request's trailing blocks beyond its first ``num_tokens`` tokens
        (the KV slots of rejected speculative tokens). Those blocks were never cached:
        only full blocks of real, computed tokens are."""
        table = self.req_blocks.get(request_id)
        if table is None:
            return
        keep = cdiv(num_tokens, self.block_size)
        while len(table) > keep:
            b = table.pop()
            assert self.block_hash[b] is None, f"block {b} of {request_id} is cached; it cannot be trimmed"
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free[b] = None
                self.free.move_to_end(b, last=False)

    def free_request(self, request_id: str) -> None:
        """Release every block of the request (idempotent)."""
        table = self.req_blocks.pop(request_id, [])
        self.req_num_hashed.pop(request_id, None)
        # Tail blocks first: of one request's cached blocks, the tail is the
        # least likely to be shared, so it should be evicted first.
        for b in reversed(table):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if self.ref_cnt[b] == 0:
                del self.cached[h]
                self.block_hash[b] = None
                self.free.move_to_end(b, last=False)

    def check_invariants(self) -> None:
        for b in range(self.num_blocks):
            in_free = b in self.free
            assert in_free == (self.ref_cnt[b] == 0), f"block {b}: ref_cnt={self.ref_cnt[b]} in_free={in_free}"
            h = self.block_hash[b]
            assert h is None or self.cached.get(h) == b, f"block {b} hash not in cache map"
        owned: dict[int, int] = {}
        for table in self.req_blocks.values():
            for b in table:
                owned[b] = owned.get(b, 0) + 1
        for b in range(self.num_blocks):
            assert owned.get(b, 0) == self.ref_cnt[b], f"block {b}: ref_cnt {self.ref_cnt[b]} != owners {owned.get(b, 0)}"
