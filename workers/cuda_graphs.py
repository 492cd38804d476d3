"""CUDA graphs for decode steps: one captured forward per padded batch size.

A decode step of a small model is launch-bound (hundreds of tiny kernels);
replaying a captured graph issues them all at once. Inputs live in static
buffers that each replay overwrites; a batch of ``n`` decodes runs the graph
captured for the smallest size >= n, the extra rows being padding that writes
no KV (slot -1) and reads one finite slot (seq_len 1). Attention's launch
grid is fixed at capture by passing ``max_seqlen_k = max_model_len``.
"""

from __future__ import annotations

import torch

from fleetlm.workers.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256 + 1, 8))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int, device):
        self.model, self.kv_caches = model, kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        z = lambda *shape, dt=torch.int32: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        self.input_ids = z(self.max_bs, dt=torch.int64)
        self.positions = z(self.max_bs, dt=torch.int64)
        self.slot_mapping = z(self.max_bs, dt=torch.int64)
        self.seq_lens = z(self.max_bs)
        self.block_tables = z(self.max_bs, max_blocks)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            args = (self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches)
            self.model(*args)  # warm up: autotuning / lazy init outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def padded_size(self, n: int) -> int | None:
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = self.padded_size(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
