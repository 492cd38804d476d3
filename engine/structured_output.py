"""Structured output on the engine side: compiled grammars, one matcher per request, bitmasks per step.

The grammar engine is xgrammar (chosen against llguidance by measurement:
``benchmarks/grammar_engines.py``; steady 2-5 us per-token masks where
llguidance's lazily built lexer states spike to milliseconds, at the price
of a 0.1-0.3 s compile per schema, which is cached and off the loop).

- Arrival (``prepare``, in ``make_group``): the grammar is built and checked
  (``engine/grammars.py``; a bad one raises before anything is queued), and
  its tokenizer-level compile starts in a thread pool (xgrammar's calls
  release the GIL), cached by the grammar's key: the same schema compiles
  once. The first compile also builds the tokenizer's table (0.5-2 s for a
  50k-130k vocabulary; warm-up pays it on GPU).
- The engine holds the request outside the scheduler until ``ready``: other
  requests keep stepping. Then each sequence gets its matcher
  (``Request.grammar``), advanced over any prior output (migration).
- Before a step's sampling (``bitmask``): an int32 ``[rows, ceil(V/32)]``
  bitmask of the step's constrained sampling rows, in pinned memory when the
  worker is a local GPU. A row per verified proposal: the matcher walks the
  proposals and is rolled back, so the target samples every position under
  the grammar, and ``workers/pending.accept`` rejects a proposal the grammar
  forbids (a masked token can never equal its sample).
- After a step (``advance``): matchers take the accepted tokens; a grammar
  that reached its end ends the request (``stop``), even with ``ignore_eos``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from fleetlm.engine.grammars import grammar_from_key, grammar_key
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.step import GrammarBitmask, SchedulerOutput

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256
FILL_THREADS_MIN_ROWS = 512  # fewer constrained rows fill their masks on one thread (see ``bitmask``)


class StructuredOutput:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], pin_memory: bool,
                 max_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.pin_memory = pin_memory
        self.max_threads = max_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleetlm-grammar")
        self._lock = threading.Lock()
        self._compiler = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._batch: dict = {}  # xgrammar BatchGrammarMatcher per thread count, made when first used
        self.num_compiles = 0

    @classmethod
    def for_engine(cls, config, tokenizer) -> StructuredOutput:
        mc, pc = config.model, config.parallel
        # Bitmasks go straight from pinned memory to a local GPU worker.
        return cls(tokenizer, mc.vocab_size, mc.eos_token_ids, pin_memory=pc.device == "cuda" and pc.world_size == 1)

    # -- arrival -----------------------------------------------------------------
    def prepare(self, params: SamplingParams) -> Future:
        """Check the request's grammar (raises ``InvalidGuidedDecoding``) and start its compile."""
        key = grammar_key(params.guided_decoding)
        fut = self._cache.get(key)
        if fut is not None:  # checked and compiled (or compiling) already
            self._cache.move_to_end(key)
            return fut
        fut = self._pool.submit(self._compile, grammar_from_key(key))
        self._cache[key] = fut
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return fut

    def _get_compiler(self):
        with self._lock:  # compiles on both pool threads need one compiler (built once, ~1 s)
            if self._compiler is None:
                self._compiler = self._make_compiler()
        return self._compiler

    def _make_compiler(self):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.eos_token_ids or None)
        # Our own LRU holds the compiled grammars; xgrammar's cache would keep a second copy.
        return xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False)

    def _compile(self, grammar):
        self.num_compiles += 1
        return self._get_compiler().compile_grammar(grammar)

    def ready(self, children: list[Request], compiled: Future) -> bool:
        """True once the grammar is compiled; then gives every child its matcher.
        Raises the compile's error (the request then fails alone)."""
        if not compiled.done():
            return False
        import xgrammar as xgr

        grammar = compiled.result()
        for req in children:
            stops = sorted(set(self.eos_token_ids) | set(req.params.stop_token_ids))
            req.grammar = xgr.GrammarMatcher(grammar, override_stop_tokens=stops or None)
            for token in req.output_token_ids:  # prior output of a migrated request
                if not req.grammar.accept_token(token):
                    raise ValueError(f"the prior output token {token} does not fit the request's grammar")
        return True

    def sort_parked(self, groups: list, wait_s: float = 0.0) -> tuple[list, list, list]:
        """(ready, failed, still compiling) of request groups waiting for their grammar, each
        in arrival order; ready ones' sequences have their matchers, failed ones end with error."""
        if wait_s and groups:
            wait([g.grammar for g in groups], timeout=wait_s, return_when=FIRST_COMPLETED)
        ready, failed, still = [], [], []
        for group in groups:
            try:
                (ready if self.ready([c.req for c in group.children], group.grammar) else still).append(group)
            except Exception as e:  # noqa: BLE001 - a grammar that failed to compile fails its request only
                logger.error("request %s: grammar failed: %r", group.request_id, e)
                for child in group.children:
                    child.req.status, child.finish_reason = RequestStatus.FINISHED_ERROR, "error"
                failed.append(group)
        return ready, failed, still

    # -- each step -----------------------------------------------------------------
    def attach(self, out: SchedulerOutput, requests: dict[str, Request], later: bool = False) -> SchedulerOutput:
        """The step with its constrained rows' bitmask, or (``later``: ahead of a step in
        flight, whose tokens the masks depend on) the promise of one after launch."""
        if not self.guided_rows(out, requests):
            return out
        if later:
            return dataclasses.replace(out, grammar_later=True)
        return dataclasses.replace(out, grammar=self.bitmask(out, requests))

    @staticmethod
    def guided_rows(out: SchedulerOutput, requests: dict[str, Request]) -> list[tuple[Request, list[int]]]:
        """The step's constrained sampling requests still running, with the proposals they verify."""
        rows = []
        for s in out.scheduled:
            req = requests.get(s.request_id)
            if s.sample and req is not None and req.grammar is not None:
                rows.append((req, s.spec_token_ids))
        return rows

    def bitmask(self, out: SchedulerOutput, requests: dict[str, Request]) -> GrammarBitmask | None:
        """The token bitmask of the step's constrained rows, from the matchers' current state."""
        import torch
        import xgrammar as xgr

        rows = self.guided_rows(out, requests)
        if not rows:
            return None
        n = sum(1 + len(props) for _, props in rows)
        words = -(-self.vocab_size // 32)
        mask = torch.empty((n, words), dtype=torch.int32, pin_memory=self.pin_memory)
        plain, plain_idx, i = [], [], 0
        for req, props in rows:
            m = req.grammar
            if m.is_terminated():  # ended by the step just processed; its sample is discarded
                mask[i : i + 1 + len(props)] = -1
            elif not props:
                plain.append(m)
                plain_idx.append(i)
            else:
                self._fill_with_proposals(m, props, mask, i)
            i += 1 + len(props)
        if plain:
            # One thread below FILL_THREADS_MIN_ROWS: xgrammar's threaded fill costs more than it saves
            # there (benchmarks/grammar_engines.py, "fill_threads": 2 threads 0.61 vs 1 thread 0.34 ms
            # at 64 rows and 1.9 vs 1.4 at 256 of a 128k vocabulary, 4.4 vs 4.7 at 1024; an H100
            # host's 8 threads took 0.76 ms at 62 rows).
            threads = 1 if len(plain) < FILL_THREADS_MIN_ROWS else self.max_threads
            batch = self._batch.get(threads)
            if batch is None:
                batch = self._batch[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
            batch.batch_fill_next_token_bitmask(plain, mask, plain_idx)
        return GrammarBitmask([req.request_id for req, _ in rows], mask)

    @staticmethod
    def _fill_with_proposals(matcher, proposals: list[int], mask, first: int) -> None:
        """Row j: the mask after proposals[:j]. Rows past a proposal the grammar refuses, or
        past its end (a proposed EOS), are all-allowed: their samples are discarded anyway."""
        walked = 0
        for j in range(1 + len(proposals)):
            if j > walked or matcher.is_terminated():
                mask[first + j] = -1
                continue
            matcher.fill_next_token_bitmask(mask, first + j)
            if j < len(proposals) and matcher.accept_token(proposals[j]):
                walked += 1
        if walked:
            matcher.rollback(walked)

    def valid_prefix(self, req: Request, proposals: list[int]) -> int:
        """How many leading proposals the request's grammar accepts (a proposer may cut the rest
        before scheduling them; verification would reject them anyway)."""
        m = req.grammar
        if m is None:
            return len(proposals)
        n = 0
        while n < len(proposals) and not m.is_terminated() and m.accept_token(proposals[n]):
            n += 1
        if n:
            m.rollback(n)
        return n

    def advance(self, results: list[tuple[Request, list[int]]]) -> list[tuple[Request, RequestStatus]]:
        """Feed each constrained request its new tokens; returns requests to end, with how."""
        ended = []
        for req, tokens in results:
            m = req.grammar
            if m is None:
                continue
            fits = True
            for token in tokens:
                if m.is_terminated():
                    break
                if not m.accept_token(token):
                    fits = False
                    break
            if not fits:
                # Sampled under the mask, so this is a bug, not a user error: fail this request only.
                logger.error("%s: token %d does not fit its grammar", req.request_id, token)
                ended.append((req, RequestStatus.FINISHED_ERROR))
            elif m.is_terminated() and not req.is_finished:
                ended.append((req, RequestStatus.FINISHED_STOPPED))
        return ended

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
