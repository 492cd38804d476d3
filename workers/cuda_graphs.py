"""CUDA graphs for decode and verify steps: one captured forward per (padded batch size, query length).

A decode step of a small model is launch-bound (hundreds of tiny kernels);
replaying a captured graph issues them all at once. Speculative decoding's
verify steps replay the decode graphs too, one row per token
(``ModelRunner._prepare``). A step whose requests
all compute the same number ``q`` of query tokens (1 for a decode, 1 + k to
verify k proposals) runs the graph captured for ``q`` and the smallest
batch size >= its own; the extra rows are padding that writes no KV (slot
-1) and reads ``q`` finite slots (seq_len q). Inputs live in static buffers
that each replay overwrites. Attention's launch grid is fixed at capture by
passing ``max_seqlen_k = max_model_len``.
"""

from __future__ import annotations

import torch

from fleetlm.workers.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256 + 1, 8))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int, device,
                 query_lens: tuple[int, ...] = (1,)):
        self.model, self.kv_caches = model, kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.query_lens = tuple(sorted(set(query_lens)))
        self.max_model_len = max_model_len
        max_tokens = self.max_bs * self.query_lens[-1]
        max_blocks = -(-max_model_len // block_size)
        z = lambda *shape, dt=torch.int32: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        self.input_ids = z(max_tokens, dt=torch.int64)
        self.positions = z(max_tokens, dt=torch.int64)
        self.slot_mapping = z(max_tokens, dt=torch.int64)
        self.seq_lens = z(self.max_bs)
        self.block_tables = z(self.max_bs, max_blocks)
        self.cu_seqlens_q = {q: torch.arange(self.max_bs + 1, dtype=torch.int32, device=device) * q
                             for q in self.query_lens}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _meta(self, bs: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: bs * q],
            cu_seqlens_q=self.cu_seqlens_q[q][: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_seqlen_q=q,
            max_seqlen_k=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        self.slot_mapping.fill_(-1)
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so smaller graphs reuse its memory pool.
        for q in reversed(self.query_lens):
            self.seq_lens.fill_(q)
            for bs in reversed(self.sizes):
                n = bs * q
                args = (self.input_ids[:n], self.positions[:n], self._meta(bs, q), self.kv_caches)
                self.model(*args)  # warm up: autotuning / lazy init outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs, q] = self.model(*args)
                self.graphs[bs, q] = graph
        torch.cuda.synchronize()

    def padded_size(self, n: int) -> int | None:
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def can_run(self, num_reqs: int, query_len: int | None) -> bool:
        """A step of ``num_reqs`` requests that all compute ``query_len`` tokens (None: they differ)."""
        return query_len in self.query_lens and self.padded_size(num_reqs) is not None

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        q = meta.max_seqlen_q
        n = input_ids.shape[0]
        reqs = n // q
        bs = self.padded_size(reqs)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n : bs * q].fill_(-1)
        self.seq_lens[:reqs].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[reqs:bs].fill_(q)
        width = meta.block_tables.shape[1]
        self.block_tables[:reqs, :width].copy_(meta.block_tables, non_blocking=True)
        self.graphs[bs, q].replay()
        return self.outputs[bs, q][:n]
