"""Runs one step of the model on one device: batch tensors in, sampled tokens out.

The runner keeps a little state per request (prompt, generated tokens,
sampling parameters) so that each step's ``SchedulerOutput`` only carries the
new tokens and block tables; penalties and seeds are applied here, on the
device, from that state.

``launch`` queues a step without waiting for the device and returns a
``PendingOutput``; the engine may launch the next step before reading it
(asynchronous scheduling). That next step's decode inputs are then
placeholders, filled on the device from this step's sampled tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from fleetlm.engine.config import CacheConfig, LoRAConfig, ModelConfig, SpeculativeConfig
from fleetlm.engine.sampling_params import needs_output_history
from fleetlm.engine.step import PLACEHOLDER, ModelRunnerOutput, SchedulerOutput
from fleetlm.kernels import select_ops
from fleetlm.parallel.context import SINGLE, ParallelContext
from fleetlm.workers import kv_cache
from fleetlm.workers.attention import AttentionMetadata
from fleetlm.workers.guided_logits import constrain_logits
from fleetlm.workers.models import model_class
from fleetlm.workers.pending import DeferredSampling, PendingOutput, ReqState
from fleetlm.workers.sampler import Sampler, SamplingBatch, SamplingRow, compute_topk_logprobs, min_tokens_banned_ids
from fleetlm.workers.spec_verify import num_accepted, proposal_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, ctx: ParallelContext, device: torch.device,
                 lora: LoRAConfig | None = None, max_rows: int = 0, spec: SpeculativeConfig | None = None):
        self.model_cfg, self.cache_cfg, self.ctx, self.spec = model_cfg, cache_cfg, ctx, spec
        self.device = device
        self.dtype = DTYPES[model_cfg.dtype]
        self.block_size = cache_cfg.block_size
        if cache_cfg.cache_dtype != "auto":
            kv_cache.check_fp8_kv_supported(device)
        self.ops = select_ops(device)
        self.model = model_class(model_cfg.hf_config)(model_cfg, ctx, self.ops, self.dtype, device)
        self.lora = None  # multi-LoRA: slots on the projections, each step's tile table
        if lora is not None:
            from fleetlm.workers.lora_manager import LoRAManager

            self.lora = LoRAManager(self.model, self.ops, lora, self.dtype, device, max_rows)
        self.sampler = Sampler()
        self.kv_caches: list[kv_cache.LayerKVCache] = []
        self.states: dict[str, ReqState] = {}
        self.graphs = None  # DecodeGraphs, once captured (CUDA only)
        # The previous launch's sampled tokens (still on the device) and each request's row in them.
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        # Steps may be launched ahead on a TP > 1 stage: rank 0 broadcasts each
        # step's sampled ids so that every rank can fill the next one's placeholders.
        self.share_samples = False
        self._deferred: DeferredSampling | None = None  # a launched step waiting for its grammar
        eos = model_cfg.eos_token_ids
        self.eos_token_ids = list(eos)
        self.verify_as_decode = device.type == "cuda"
        self.drafter = None  # speculative decoding with a draft model (workers/drafter.py)
        if spec is not None and spec.uses_draft_model and ctx.is_last_stage and ctx.tp_rank == 0:
            from fleetlm.workers.drafter import Drafter

            # Whole, on the one rank that samples: see drafter.py for why it is not sharded.
            self.drafter = Drafter(spec, self.block_size, SINGLE, self.ops, self.dtype, device, cache_cfg.cache_dtype)

    # -- setup -----------------------------------------------------------------
    def load_weights(self, weights) -> None:
        self.model.load_weights(weights)

    def kv_bytes_per_block(self) -> int:
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        kv_heads = attn.num_kv_heads if attn else 1
        target = kv_cache.kv_bytes_per_block(self.model.num_local_layers, self.block_size, kv_heads,
                                             self.model_cfg.head_dim, self.cache_cfg.cache_dtype, self.dtype)
        return target + (self.drafter.kv_bytes_per_block() if self.drafter is not None else 0)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the pool (FP8: with each layer's scales, from its loaded weights)."""
        attn = self.model.layers[0].self_attn
        self.kv_caches = kv_cache.allocate(self.model.layers, num_blocks, self.block_size, attn.num_kv_heads,
                                           self.model_cfg.head_dim, self.cache_cfg.cache_dtype, self.dtype,
                                           self.device)
        if self.drafter is not None:
            self.drafter.init_kv_cache(num_blocks)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> float:
        """Capture decode graphs (single-stage CUDA workers only); returns seconds taken."""
        import time

        from fleetlm.workers.cuda_graphs import DecodeGraphs

        t0 = time.perf_counter()
        if self.lora is not None:
            self.lora.state.active = True  # capture the LoRA kernels: replays read the tile table
        rows = max_num_seqs
        if self.spec is not None:  # verify steps run as decode steps of one row per token (see _prepare)
            rows = max(rows, min(max_num_seqs, self.spec.disable_by_batch_size) * self.spec.num_verify_tokens)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, rows, max_model_len, self.block_size, self.device)
        self.graphs.capture()
        if self.drafter is not None:
            self.drafter.capture_cuda_graphs(min(max_num_seqs, self.spec.disable_by_batch_size), max_model_len)
        return time.perf_counter() - t0

    # -- one step ----------------------------------------------------------------
    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:
            self.states.pop(rid, None)
        for new in out.new_requests:
            prior = list(new.prior_output_token_ids)
            self.states[new.request_id] = ReqState(list(new.prompt_token_ids), new.params, prior, len(prior))

    def _upload(self, dtype: torch.dtype, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Copy host arrays to the device in one transfer, without waiting for the stream.

        On CUDA the bytes are staged in pinned memory from PyTorch's caching
        host allocator, which does not hand that block out again before the
        copy reading it has run, so a later step cannot overwrite them early.
        """
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(_NP_DTYPES[dtype], copy=False))
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        dev = flat.to(self.device, non_blocking=True)
        return [t.view(a.shape) for t, a in zip(dev.split([a.size for a in arrays]), arrays)]

    # On a GPU, a verify step whose requests each compute at most this many tokens runs as a
    # decode step of one row per token (see _prepare); longer ones (prefill chunks) keep one row
    # per request. On CPU the torch attention runs one call per row: one per request is cheaper.
    VERIFY_AS_DECODE_MAX_Q = 16

    def _prepare(self, out: SchedulerOutput, per_token: bool = False):
        """Device inputs of a step. ``per_token``: the attention metadata has one row per token:
        token j of a request computing tokens from ``start`` attends ``start + j + 1`` keys through
        the request's block table, exactly as in a decode step. A short verify step then runs the
        split-K decode kernel (and the decode CUDA graphs, at batch = its token count) instead of
        the prefill kernel's few programs per request."""
        sched = out.scheduled
        q_lens = np.fromiter((len(s.token_ids) for s in sched), dtype=np.int64, count=len(sched))
        starts = np.fromiter((s.start_pos for s in sched), dtype=np.int64, count=len(sched))
        cu = np.zeros(len(sched) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        seq_lens = starts + q_lens
        input_ids = np.fromiter((t for s in sched for t in s.token_ids), dtype=np.int64, count=int(cu[-1]))
        # positions: start_pos of each request + offset within its chunk
        req_of_token = np.repeat(np.arange(len(sched)), q_lens)
        positions = starts[req_of_token] + (np.arange(cu[-1]) - cu[:-1][req_of_token])
        max_blocks = max(len(s.block_table) for s in sched)
        tables = np.zeros((len(sched), max_blocks), dtype=np.int64)
        for i, s in enumerate(sched):
            tables[i, : len(s.block_table)] = s.block_table
        bs = self.block_size
        slots = tables[req_of_token, positions // bs] * bs + positions % bs
        # Logits at each sampling request's last 1 + num_spec_tokens positions.
        sample_idx = [i for i, s in enumerate(sched) if s.sample]
        if out.num_spec_tokens:
            logit_pos = np.fromiter((cu[i + 1] - sched[i].num_logits + j for i in sample_idx
                                     for j in range(sched[i].num_logits)), dtype=np.int64)
        else:
            logit_pos = cu[1:][sample_idx] - 1
        row_starts = cu[:-1]
        if per_token:
            cu, seq_lens, tables = np.arange(cu[-1] + 1), positions + 1, tables[req_of_token]
        # Placeholders: tokens sampled by the previous launch, still on the device.
        holes = np.flatnonzero(input_ids == PLACEHOLDER)
        rows = self._rows_of_previous_launch(sched, req_of_token[holes])
        ids, pos, slots_d, logits_indices, holes_d, rows_d = self._upload(
            torch.int64, input_ids, positions, slots, logit_pos, holes, rows
        )
        cu_d, seq_lens_d, tables_d = self._upload(torch.int32, cu, seq_lens, tables)
        if holes.size:
            ids.index_copy_(0, holes_d, self._last_sampled.index_select(0, rows_d))
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            cu_seqlens_q=cu_d,
            seq_lens=seq_lens_d,
            block_tables=tables_d,
            max_seqlen_q=1 if per_token else int(q_lens.max()),
            max_seqlen_k=int(seq_lens.max()),
        )
        return ids, pos, meta, sample_idx, logits_indices, row_starts

    def _rows_of_previous_launch(self, sched, reqs_with_holes: np.ndarray) -> np.ndarray:
        rows = np.empty(len(reqs_with_holes), dtype=np.int64)
        for j, i in enumerate(reqs_with_holes):
            row = self._last_rows.get(sched[i].request_id)
            if row is None:
                raise RuntimeError(f"{sched[i].request_id}: placeholder token but the previous step did not sample it")
            rows[j] = row
        return rows

    def _sampling_batch(self, states: list[ReqState], proposals: list[list[int]]) -> SamplingBatch:
        """One row per logit position: a request verifying k proposals has 1 + k rows,
        row j sampling its output token number ``num_sampled + j`` as if proposals[:j] were accepted."""
        rows = []
        for st, props in zip(states, proposals):
            p = st.params
            if st.num_sampled != len(st.output_token_ids) and needs_output_history(p):
                raise RuntimeError("penalties need every earlier output token on the host (schedule synchronously)")
            for j in range(1 + len(props)):
                rows.append(
                    SamplingRow(
                        params=p,
                        prompt_token_ids=st.prompt_token_ids,
                        output_token_ids=st.output_token_ids + props[:j] if j else st.output_token_ids,
                        # min_tokens counts the tokens of steps still in flight: their number is known.
                        banned_token_ids=min_tokens_banned_ids(p, st.num_sampled + j, self.eos_token_ids),
                        output_index=st.num_sampled + j,
                    )
                )
            st.num_sampled += 1  # at least one token; the result adds the accepted proposals
        return SamplingBatch.build(rows, self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, hidden=None, residual=None):
        """Run this worker's part of the step and wait for it.

        Non-last pipeline stages return (hidden, residual) for the next stage;
        the last stage returns a ``ModelRunnerOutput``.
        """
        step = self.launch(out, hidden, residual)
        return step.result() if isinstance(step, PendingOutput) else step

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, hidden=None, residual=None):
        """Queue the step on the device and return without waiting for it.

        Nothing on this path waits for the device (no ``.item()``, no reading
        a device value): the host may launch the next step while this one runs.
        Placeholder tokens are filled on the device from the sampled tokens of
        the previous launch. The last stage returns a ``PendingOutput``.
        """
        if self._deferred is not None and not self._deferred.sampled:
            raise RuntimeError("launch before the previous step got its grammar (its samples feed this step)")
        self._update_states(out)
        if out.is_empty:
            return PendingOutput.ready(ModelRunnerOutput.empty())
        per_token = self.verify_as_decode and bool(out.num_spec_tokens) and \
            max(len(s.token_ids) for s in out.scheduled) <= self.VERIFY_AS_DECODE_MAX_Q
        ids, pos, meta, sample_idx, logits_indices, row_starts = self._prepare(out, per_token)
        self._last_sampled, self._last_rows = None, {}
        rows = out.num_batched_tokens if per_token else len(out.scheduled)
        q = meta.max_seqlen_q
        uniform = q == 1 or all(len(s.token_ids) == q for s in out.scheduled)
        graph = self.graphs is not None and hidden is None and self.graphs.can_run(rows, q if uniform else None)
        if self.lora is not None:
            self.lora.prepare(out, self.graphs.padded_size(rows) * q if graph else ids.shape[0])
        if graph:
            result = self.graphs.run(ids, pos, meta)
        else:
            result = self.model(ids, pos, meta, self.kv_caches, hidden, residual)
        draft = None
        if self.drafter is not None and out.draft:
            self.drafter.catch_up(out, self._prepare, ids, pos, meta, rows if q == 1 else None)
            # Each sampling request's block table for the draft's proposals: its (first) row.
            (table_rows,) = self._upload(torch.int64, row_starts[sample_idx] if per_token else np.asarray(sample_idx))
            draft = meta.block_tables.index_select(0, table_rows)
        if not self.ctx.is_last_stage:
            return result
        prompt = self._prompt_logprobs(out, result, row_starts)
        sampling = [out.scheduled[i] for i in sample_idx]
        req_ids = [s.request_id for s in sampling]
        proposals = [s.spec_token_ids for s in sampling]
        if not sampling or self.ctx.tp_rank != 0:
            # Every TP rank joins the logits all-gather, but only rank 0
            # samples: the other ranks' tokens would be discarded. With
            # steps launched ahead they still need the ids, for the next
            # step's placeholders.
            if sampling:
                self.model.compute_logits(result[logits_indices])
                if self.share_samples:
                    num_rows = len(sampling) + sum(len(p) for p in proposals)
                    self._last_sampled = self.ctx.broadcast_from_first(
                        torch.empty(num_rows, dtype=torch.int64, device=self.device))
                    self._remember_rows(req_ids, proposals)
            return PendingOutput([], [], [], prompt=prompt) if prompt and self.ctx.tp_rank == 0 else \
                PendingOutput.ready(ModelRunnerOutput.empty())
        logits = self.model.compute_logits(result[logits_indices]).float()
        states = [self.states[rid] for rid in req_ids]
        batch = self._sampling_batch(states, proposals)

        def sample(grammar):
            return self._sample(logits, batch, grammar, sampling, states, proposals, prompt, draft, out.num_spec_tokens)

        if out.grammar_later:  # the bitmask is built from the step in flight, while this forward runs
            self._deferred = DeferredSampling(sample)
            return self._deferred
        return sample(out.grammar)

    def _sample(self, logits, batch, grammar, sampling, states, proposals, prompt, draft_tables,
                num_spec: int) -> PendingOutput:
        """Sample every row; with proposals, accept on the device (``spec_verify.py``); with the
        draft model running (``draft_tables``: the sampling requests' block tables), propose."""
        req_ids = [s.request_id for s in sampling]
        if grammar is not None and grammar.request_ids:
            logits = self._constrain(logits, batch, grammar, req_ids, proposals)
        sampled = self.sampler(logits, batch)
        tokens, accepted = sampled.sampled_token_ids, None
        if num_spec:
            rows, firsts = proposal_rows(proposals)
            accepted = tokens == self._upload(torch.int64, rows)[0]
            if self.drafter is not None:
                tokens, accepted = self.drafter.reject(logits, batch, tokens, accepted, req_ids, proposals, firsts,
                                                       self._upload)
        else:
            firsts = np.arange(len(sampling), dtype=np.int64)
        drafted = None
        if draft_tables is not None:
            counts = np.fromiter((len(p) for p in proposals), dtype=np.int64, count=len(proposals))
            n_acc = num_accepted(accepted, *self._upload(torch.int64, firsts, counts), int(counts.max())) \
                if accepted is not None else torch.zeros(len(sampling), dtype=torch.int64, device=self.device)
            drafted = self.drafter.propose(sampling, states, tokens, n_acc, firsts, draft_tables, self._upload)
        self._last_sampled = tokens
        self._remember_rows(req_ids, proposals)
        if self.share_samples:
            self.ctx.broadcast_from_first(tokens)
        logprobs = None
        if sampled.logprobs is not None:
            logprobs = [sampled.logprob_token_ids, sampled.logprobs, sampled.sampled_ranks]
            if tokens is not sampled.sampled_token_ids:  # rejection sampling replaced some rows' tokens
                k = max(n for n in batch.num_logprobs if n is not None)
                logprobs = list(compute_topk_logprobs(torch.log_softmax(logits, -1), tokens, k))
        return PendingOutput(req_ids, states, proposals, tokens, accepted, logprobs, prompt, drafted)

    def _remember_rows(self, req_ids: list[str], proposals: list[list[int]]) -> None:
        """Which row of this launch's samples each request's next placeholder reads (requests
        that verified proposals are never scheduled ahead: their token count is unknown)."""
        if any(proposals):
            first_rows = np.cumsum([0] + [1 + len(p) for p in proposals[:-1]]).tolist()
            self._last_rows = dict(zip(req_ids, first_rows))
        else:
            self._last_rows = {rid: i for i, rid in enumerate(req_ids)}

    def _constrain(self, logits, batch: SamplingBatch, grammar, req_ids: list[str], proposals: list[list[int]]):
        """Mask the constrained rows (``workers/guided_logits.py``); their bitmask rows reach the
        device without a wait."""
        first, row = {}, 0
        for rid, props in zip(req_ids, proposals):
            first[rid] = (row, 1 + len(props))
            row += 1 + len(props)
        rows = [first[rid][0] + j for rid in grammar.request_ids for j in range(first[rid][1])]
        if len(rows) != grammar.bitmask.shape[0]:
            raise RuntimeError(f"grammar bitmask has {grammar.bitmask.shape[0]} rows for {len(rows)} constrained rows")
        (rows_d,) = self._upload(torch.int64, np.asarray(rows, dtype=np.int64))
        bitmask = grammar.bitmask.to(self.device, non_blocking=True)
        return constrain_logits(logits, batch, rows, rows_d, bitmask, self.ops.apply_token_bitmask)

    # Prompt positions whose logits are computed at once for prompt logprobs (bounds the
    # float32 [rows, vocab] scratch: 512 x 128k vocab = 256 MiB).
    PROMPT_LOGITS_CHUNK = 512

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, row_starts: np.ndarray):
        """(request id, first position, [ids, logprobs, ranks]) of the prompt positions this step
        computed for requests with ``prompt_logprobs``: position p scores prompt token p."""
        found = []
        for s, row in zip(out.scheduled, row_starts.tolist()):
            n = len(s.token_ids)
            st = self.states[s.request_id]
            k = st.params.prompt_logprobs
            # Logits at position p - 1 score prompt token p: this chunk's positions
            # [start, start + n) score tokens [start + 1, start + n + 1) of the prompt.
            lo, hi = s.start_pos + 1, min(s.start_pos + n + 1, len(st.prompt_token_ids))
            if k is not None and hi > lo:
                rows = torch.arange(row + lo - 1 - s.start_pos, row + hi - 1 - s.start_pos, device=hidden.device)
                targets = torch.tensor(st.prompt_token_ids[lo:hi], device=hidden.device)
                parts = []
                for c in range(0, hi - lo, self.PROMPT_LOGITS_CHUNK):
                    logits = self.model.compute_logits(hidden[rows[c:c + self.PROMPT_LOGITS_CHUNK]]).float()
                    parts.append(compute_topk_logprobs(torch.log_softmax(logits, -1),
                                                       targets[c:c + self.PROMPT_LOGITS_CHUNK], k))
                found.append((s.request_id, lo, [torch.cat([p[i] for p in parts]) for i in range(3)]))
        return found


