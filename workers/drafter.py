"""The draft model: a smaller model beside the target, proposing tokens for the whole batch at once.

It lives in the target's worker with a KV cache of its own, laid out like the
target's: the same block tables and slots address both (a block holds both
models' K/V, and ``kv_bytes_per_block`` counts both), so the block manager
allocates, shares through the prefix cache and frees them together, from one
memory budget.

In a step where it runs (``ScheduledRequest.draft_token_ids`` is not None):

1. ``catch_up``: one forward over the tokens the target computes this step,
   each request's preceded by those the draft missed (steps it did not run,
   or a prefix-cache hit whose draft K/V it cannot vouch for), so its K/V
   match the target's up to the step's last position;
2. ``propose``: once the target has verified and sampled, from each
   proposing request's last accepted token, ``k`` single-token forwards of
   the whole proposing batch, each sampling the next proposal: the argmax for
   greedy requests, else a draw from the draft's distribution ``q`` (kept for
   rejection sampling when the proposals are verified, ``spec_verify.py``).
   Their K/V go to the lookahead slots the scheduler added past the step's
   tokens; the target's next step overwrites what it keeps.

Under tensor or pipeline parallelism the draft is whole (unsharded) on the
one worker that samples (last stage, TP rank 0), with no collective in its
forwards; the other workers never see it. Sharding it would put two
all-reduces per layer into each of its k + 1 forwards per step, latency a
small model cannot hide (a 135M draft's single-token forward is itself a
fraction of a millisecond, one small NCCL all-reduce 10-20 us), and would tie
every rank to the proposal loop. The price is that rank's memory: the whole
draft's weights and its KV per block, which its block budget counts (the
replica takes the smallest worker's budget).

Nothing here waits for the device: positions depend on the accepted counts,
which stay on the device. Cost per step: one draft forward over the step's
tokens plus ``k`` forwards of one token per proposing request, CUDA graphs
of (batch, 1) and (batch, k + 1) on GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fleetlm.engine.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from fleetlm.engine.step import ScheduledRequest, SchedulerOutput
from fleetlm.workers import kv_cache
from fleetlm.workers.attention import AttentionMetadata
from fleetlm.workers.models import model_class
from fleetlm.workers.pending import ReqState
from fleetlm.workers.sampler import Sampler, SamplingBatch, SamplingRow, exponential_noise
from fleetlm.workers.spec_verify import rejection_sample, salted

_DRAFT_SALT = 0x5EC2  # the draft's draws: a stream of their own per seeded request


class Drafter:
    def __init__(self, spec: SpeculativeConfig, block_size: int, ctx, ops, dtype: torch.dtype, device,
                 cache_dtype: str = "auto") -> None:
        self.cfg = spec.draft
        self.k = spec.num_speculative_tokens
        self.max_batch = spec.disable_by_batch_size
        self.model = model_class(self.cfg.hf_config)(self.cfg, ctx, ops, dtype, device)
        self.dtype, self.device, self.block_size = dtype, device, block_size
        self.cache_dtype = cache_dtype  # the target's (an FP8 cache takes each draft layer's own scales)
        self.kv_caches: list[kv_cache.LayerKVCache] = []
        self.graphs = None
        self.sampler = Sampler()
        # Draft distributions of the last proposals of sampled (temperature > 0) requests:
        # ([B, k, V] probabilities, request id -> row), replaced by every propose().
        self._q: tuple[torch.Tensor, dict[str, int]] | None = None

    # -- setup -----------------------------------------------------------------
    def load_weights(self, weights) -> None:
        self.model.load_weights(weights)

    def kv_bytes_per_block(self) -> int:
        return kv_cache.kv_bytes_per_block(self.model.num_local_layers, self.block_size,
                                           self.model.layers[0].self_attn.num_kv_heads, self.cfg.head_dim,
                                           self.cache_dtype, self.dtype)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = kv_cache.allocate(self.model.layers, num_blocks, self.block_size,
                                           self.model.layers[0].self_attn.num_kv_heads, self.cfg.head_dim,
                                           self.cache_dtype, self.dtype, self.device)

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Decode graphs up to ``max_batch`` x (k + 1) rows: the proposal loop's one token per
        request, and the catch-up over a verify step's tokens, one row per token."""
        from fleetlm.workers.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch * (self.k + 1), max_model_len,
                                   self.block_size, self.device)
        self.graphs.capture()

    # -- one step --------------------------------------------------------------
    def _forward(self, ids, pos, meta: AttentionMetadata, rows: int | None) -> torch.Tensor:
        """``rows``: the metadata's rows when each has one query token (a decode graph may run it)."""
        if self.graphs is not None and rows is not None and self.graphs.can_run(rows, 1):
            return self.graphs.run(ids, pos, meta)
        return self.model(ids, pos, meta, self.kv_caches)

    def catch_up(self, out: SchedulerOutput, prepare, ids, pos, meta: AttentionMetadata, rows: int | None) -> None:
        """The draft's K/V of the step's tokens (and of those it missed before them): on the
        target's own inputs ``ids, pos, meta`` (``rows`` as in ``_forward``) unless it missed some."""
        mine = [s for s in out.scheduled if s.draft_token_ids is not None]
        if len(mine) < len(out.scheduled) or any(s.draft_token_ids for s in mine):
            shadow = SchedulerOutput([dataclasses.replace(
                s, token_ids=s.draft_token_ids + s.token_ids, start_pos=s.start_pos - len(s.draft_token_ids),
                num_spec_tokens=0, sample=False) for s in mine])
            ids, pos, meta = prepare(shadow)[:3]
            rows = None
        self._forward(ids, pos, meta, rows)

    def reject(self, logits: torch.Tensor, batch: SamplingBatch, tokens: torch.Tensor, accepted: torch.Tensor,
               req_ids: list[str], proposals: list[list[int]], firsts: np.ndarray, upload):
        """Rejection sampling for the rows verifying this drafter's sampled proposals
        (deterministic ones keep the comparison the caller made). ``upload(dtype, *arrays)``:
        the runner's host->device copy that does not wait for the device."""
        if self._q is None:
            return tokens, accepted
        q_all, q_row = self._q
        rows, q_idx, x = [], [], []
        for rid, props, first in zip(req_ids, proposals, firsts.tolist()):
            r = q_row.get(rid)
            if r is not None and props:
                rows += range(first, first + len(props))
                q_idx += [r * q_all.shape[1] + j for j in range(len(props))]
                x += props
        if not rows:
            return tokens, accepted
        rows_d, qi, x_d = upload(torch.int64, np.array(rows), np.array(q_idx), np.array(x))
        p = self.sampler.probabilities(logits, batch).index_select(0, rows_d)
        q = q_all.flatten(0, 1).index_select(0, qi)
        acc, tok = rejection_sample(p, q, x_d, [batch.seeds[r] for r in rows], [batch.seed_offsets[r] for r in rows])
        tokens, accepted = tokens.clone(), accepted.clone()
        tokens[rows_d], accepted[rows_d] = tok, acc
        return tokens, accepted

    def propose(self, sampling: list[ScheduledRequest], states: list[ReqState], tokens: torch.Tensor,
                num_accepted: torch.Tensor, firsts: np.ndarray, block_tables: torch.Tensor, upload):
        """Proposals for the next step: ``[B', kmax]`` on the device and, per row, (index into
        ``sampling``, how many of its tokens count). None when no request asked. ``upload`` as
        in ``reject``."""
        who = [i for i, s in enumerate(sampling) if s.num_draft_tokens]
        if not who:
            self._q = None
            return None
        dev, bs = tokens.device, self.block_size
        counts = np.array([sampling[i].num_draft_tokens for i in who], dtype=np.int64)
        kmax = int(counts.max())
        # Row j of request i sits at position last - m + j; its last accepted token's successor
        # (the token fed first) at last - m + n + 1.
        ends = np.array([sampling[i].start_pos + len(sampling[i].token_ids) for i in who], dtype=np.int64)
        base = ends - np.array([sampling[i].num_spec_tokens for i in who], dtype=np.int64)
        who_d, firsts_d, base_d, counts_d = upload(torch.int64, np.array(who), firsts[who], base, counts)
        n = num_accepted.index_select(0, who_d)
        tok = tokens.index_select(0, firsts_d + n)
        pos = base_d + n
        tables = block_tables.index_select(0, who_d)
        width = tables.shape[1]
        batch = self._sampling_batch([states[i] for i in who], dev)
        # Output index of each request's first row this step (the runner counted the step's own token).
        firsts_out = [states[i].num_sampled - 1 for i in who]
        stored = not batch.all_greedy
        cu = torch.arange(len(who) + 1, dtype=torch.int32, device=dev)
        max_k = int(ends.max()) + kmax
        out, qs = [], []
        for it in range(kmax):
            live = counts_d > it
            # Rows past their own count (their K/V would leave their blocks) idle at position 0.
            p = torch.where(live, pos, 0)
            blk = tables.gather(1, (p // bs).clamp(max=width - 1).unsqueeze(1)).squeeze(1).to(torch.int64)
            slots = torch.where(live, blk * bs + p % bs, -1)
            meta = AttentionMetadata(slots, cu, (p + 1).to(torch.int32), tables, 1, max_k)
            logits = self.model.compute_logits(self._forward(tok, p, meta, len(who))).float()
            if stored:
                # A key per (step, iteration): no two proposals of a request share noise.
                offsets = [s * (MAX_SPECULATIVE_TOKENS + 1) + it for s in firsts_out]
                probs = self.sampler.probabilities(logits, batch)
                tok = probs.div(exponential_noise(probs, batch.seeds, offsets)).argmax(-1)
                qs.append(probs)
            else:
                tok = logits.argmax(-1)
            out.append(tok)
            pos = pos + 1
        rids = [sampling[i].request_id for i in who]
        self._q = (torch.stack(qs, 1), {rid: r for r, rid in enumerate(rids)}) if stored else None
        return torch.stack(out, 1), list(zip(who, counts.tolist()))

    def _sampling_batch(self, states: list[ReqState], device) -> SamplingBatch:
        """The draft's sampling: the request's temperature, top-k/top-p/min-p; no penalties, bias
        or bans (any proposal distribution is exact under rejection sampling; these keep it cheap).
        Seeded requests draw from a stream keyed by (seed, step's first output index, iteration)."""
        b = SamplingBatch.build([SamplingRow(st.params, (), ()) for st in states], device)
        n = b.num_rows
        return dataclasses.replace(b, seeds=salted(b.seeds, _DRAFT_SALT), banned_token_ids=[[]] * n,
                                   logit_bias=[None] * n, num_logprobs=[None] * n, no_penalties=True)
