"""Chained block hashes: the identity of a full KV block in the prefix cache.

A block's hash covers its own tokens *and* every token before it (through the
parent hash), so equal hashes mean equal prefixes. SHA-256 keeps collisions out
of reach even across tenants sharing one cache. The ingress computes the same
hashes to route a request to the replica that already holds its prefix, so
this module stays free of torch and of the rest of the engine.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_ROOT = b"\x00" * 32


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: str | None = None) -> bytes:
    """SHA-256 of (parent hash, token ids, extra key such as a LoRA adapter id)."""
    h = hashlib.sha256(parent or _ROOT)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_key is not None:
        h.update(b"\xff" + extra_key.encode())
    return h.digest()


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_key: str | None = None,
    parent: bytes | None = None,
    start: int = 0,
) -> list[bytes]:
    """Hashes of the full blocks of ``token_ids[start:]`` (a partial tail block has none).

    ``parent``/``start`` continue an existing chain: ``start`` must be a multiple
    of ``block_size`` and ``parent`` the hash of the block ending at ``start``.
    """
    hashes: list[bytes] = []
    for lo in range(start, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[lo : lo + block_size], extra_key)
        hashes.append(parent)
    return hashes


def block_hash_id(h: bytes) -> int:
    """A compact 63-bit id of a block hash, for replica summaries sent to routers."""
    return int.from_bytes(h[:8], "little") >> 1
