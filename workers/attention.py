"""Paged attention as a layer: write this step's K/V into the cache, attend over it.

One metadata object describes a whole step (a ragged batch of prefills,
prefill chunks and decodes, see the kernels' shape conventions), built once
by the model runner and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fleetlm.workers.kv_cache import LayerKVCache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32: tokens in cache after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32
    max_seqlen_q: int
    max_seqlen_k: int


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ops) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.ops = ops

    def forward(self, q, k, v, meta: AttentionMetadata, kv_cache: LayerKVCache):
        c = kv_cache
        self.ops.store_kv_cache(k, v, c.k, c.v, meta.slot_mapping, c.k_scale, c.v_scale)
        return self.ops.paged_attention(
            q, c.k, c.v, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
            self.scale, meta.max_seqlen_q, meta.max_seqlen_k, c.k_scale, c.v_scale,
        )
