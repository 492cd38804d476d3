"""Runs one step of the model on one device: batch tensors in, sampled tokens out.

The runner keeps a little state per request (prompt, generated tokens,
sampling parameters) so that each step's ``SchedulerOutput`` only carries the
new tokens and block tables; penalties and seeds are applied here, on the
device, from that state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fleetlm.engine.config import CacheConfig, ModelConfig
from fleetlm.engine.sampling_params import SamplingParams
from fleetlm.engine.scheduler import SchedulerOutput
from fleetlm.kernels import select_ops
from fleetlm.parallel.context import ParallelContext
from fleetlm.workers.attention import AttentionMetadata
from fleetlm.workers.models import model_class
from fleetlm.workers.sampler import Sampler, SamplingBatch, SamplingRow

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _ReqState:
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """What crosses back to the engine each step: a few ints (and floats) per sampling request."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    # Per request: None, or [(token_id, logprob, rank)] with the sampled token first.
    logprobs: list[list[tuple[int, float, int]] | None] | None = None


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, ctx: ParallelContext, device: torch.device):
        self.model_cfg, self.cache_cfg, self.ctx = model_cfg, cache_cfg, ctx
        self.device = device
        self.dtype = DTYPES[model_cfg.dtype]
        self.block_size = cache_cfg.block_size
        self.ops = select_ops(device)
        self.model = model_class(model_cfg.hf_config)(model_cfg, ctx, self.ops, self.dtype, device)
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: dict[str, _ReqState] = {}
        self.graphs = None  # DecodeGraphs, once captured (CUDA only)
        eos = model_cfg.eos_token_ids
        self.eos_token_ids = list(eos)

    # -- setup -----------------------------------------------------------------
    def load_weights(self, weights) -> None:
        self.model.load_weights(weights)

    def kv_bytes_per_block(self) -> int:
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        kv_heads = attn.num_kv_heads if attn else 1
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.model.num_local_layers * self.block_size * kv_heads * self.model_cfg.head_dim * elem

    def init_kv_cache(self, num_blocks: int) -> None:
        attn = self.model.layers[0].self_attn
        shape = (num_blocks, self.block_size, attn.num_kv_heads, self.model_cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.model.num_local_layers)
        ]

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> float:
        """Capture decode graphs (single-stage CUDA workers only); returns seconds taken."""
        import time

        from fleetlm.workers.cuda_graphs import DecodeGraphs

        t0 = time.perf_counter()
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len, self.block_size, self.device)
        self.graphs.capture()
        return time.perf_counter() - t0

    # -- one step ----------------------------------------------------------------
    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:
            self.states.pop(rid, None)
        for new in out.new_requests:
            self.states[new.request_id] = _ReqState(
                list(new.prompt_token_ids), new.params, list(new.prior_output_token_ids)
            )

    def _prepare(self, out: SchedulerOutput):
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
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            cu_seqlens_q=torch.from_numpy(cu.astype(np.int32)).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev, non_blocking=True),
            max_seqlen_q=int(q_lens.max()),
            max_seqlen_k=int(seq_lens.max()),
        )
        sample_idx = [i for i, s in enumerate(sched) if s.sample]
        logits_indices = torch.from_numpy(cu[1:][sample_idx] - 1).to(dev, non_blocking=True)
        ids = torch.from_numpy(input_ids).to(dev, non_blocking=True)
        pos = torch.from_numpy(positions).to(dev, non_blocking=True)
        return ids, pos, meta, sample_idx, logits_indices

    def _sampling_batch(self, req_ids: list[str]) -> SamplingBatch:
        rows = []
        for rid in req_ids:
            st = self.states[rid]
            p = st.params
            banned: list[int] = []
            if len(st.output_token_ids) < p.min_tokens:
                banned = ([] if p.ignore_eos else self.eos_token_ids) + list(p.stop_token_ids or [])
            rows.append(
                SamplingRow(
                    params=p,
                    prompt_token_ids=st.prompt_token_ids,
                    output_token_ids=st.output_token_ids,
                    banned_token_ids=banned,
                )
            )
        return SamplingBatch.build(rows, self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, hidden=None, residual=None):
        """Run this worker's part of the step.

        Non-last pipeline stages return (hidden, residual) for the next stage;
        the last stage returns a ``ModelRunnerOutput``.
        """
        self._update_states(out)
        if out.is_empty:
            return ModelRunnerOutput([], [])
        ids, pos, meta, sample_idx, logits_indices = self._prepare(out)
        if self.graphs is not None and hidden is None and meta.max_seqlen_q == 1 and self.graphs.padded_size(len(out.scheduled)):
            result = self.graphs.run(ids, pos, meta)
        else:
            result = self.model(ids, pos, meta, self.kv_caches, hidden, residual)
        if not self.ctx.is_last_stage:
            return result
        req_ids = [out.scheduled[i].request_id for i in sample_idx]
        if not req_ids:
            return ModelRunnerOutput([], [])
        logits = self.model.compute_logits(result[logits_indices]).float()
        if self.ctx.tp_rank != 0:
            # Every TP rank joins the logits all-gather, but only rank 0
            # samples: the other ranks' tokens would be discarded.
            return ModelRunnerOutput([], [])
        sampled = self.sampler(logits, self._sampling_batch(req_ids))
        tokens = sampled.sampled_token_ids.tolist()
        for rid, t in zip(req_ids, tokens):
            self.states[rid].output_token_ids.append(t)
        return ModelRunnerOutput(req_ids, tokens, self._logprobs(req_ids, sampled))

    def _logprobs(self, req_ids, sampled):
        if sampled.logprobs is None:
            return None
        ids = sampled.logprob_token_ids.tolist()
        lps = sampled.logprobs.tolist()
        ranks = sampled.sampled_ranks.tolist()
        result = []
        for i, rid in enumerate(req_ids):
            k = self.states[rid].params.logprobs
            if k is None:
                result.append(None)
                continue
            row = [(ids[i][0], lps[i][0], ranks[i])]
            row += [(ids[i][j], lps[i][j], j) for j in range(1, k + 1)]
            result.append(row)
        return result
