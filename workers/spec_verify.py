"""Verifying proposals on the device: which the target accepts, and the token that follows them.

A request verifying ``m`` proposals ``x_0 .. x_{m-1}`` owns ``m + 1`` sampling
rows; row ``j`` holds the target's distribution ``p_j`` of the token after its
newest token and ``x_0 .. x_{j-1}``. Each row yields a token and (rows
``j < m``) whether ``x_j`` is accepted; the request's result is its accepted
prefix, then the token of the first row that did not accept (the last row's
when all did: the bonus token).

- Deterministic proposals (n-gram lookups, a greedy draft; ``q`` one-hot):
  every row samples ``p_j`` as it would without speculation, with the same
  seeded noise, and ``x_j`` is accepted iff row ``j``'s sample equals it. That
  is rejection sampling with one-hot ``q``: ``x_j`` is kept with probability
  ``p_j(x_j) = min(1, p_j(x_j) / 1)``, and a disagreeing sample is
  distributed as ``normalize(max(0, p_j - q_j))`` (``p_j`` without ``x_j``).
  Outputs equal those without speculation token for token, seeded ones too.
- Sampled draft proposals (temperature > 0, ``q_j`` the draft's distribution,
  ``rejection_sample``): ``x_j`` is accepted with probability
  ``min(1, p_j(x_j) / q_j(x_j))``; a rejected row draws from
  ``normalize(max(0, p_j - q_j))``. Accepted tokens then follow ``p`` exactly
  (Leviathan et al. 2023; Chen et al. 2023). Seeded rows draw their uniform
  and their residual sample from generators keyed by (seed, output index), on
  streams of their own.

Cost: ``O(rows x vocab)`` elementwise work, beside the sampler's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fleetlm.workers.sampler import exponential_noise, step_seed

# Stream salts: a seeded row's uniform and residual draws never reuse the noise of its samples.
_UNIFORM_SALT = 0x5EC0
_RESIDUAL_SALT = 0x5EC1
NO_PROPOSAL = -1  # a row after the last proposal (never equal to a token)


def proposal_rows(proposals: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per sampling row the proposal it verifies (``NO_PROPOSAL`` on each request's last row),
    and each request's first row."""
    counts = np.fromiter((len(p) + 1 for p in proposals), dtype=np.int64, count=len(proposals))
    firsts = np.zeros(len(proposals), dtype=np.int64)
    np.cumsum(counts[:-1], out=firsts[1:])
    rows = np.fromiter((t for p in proposals for t in (*p, NO_PROPOSAL)), dtype=np.int64, count=int(counts.sum()))
    return rows, firsts


def salted(seeds: Sequence[int | None], salt: int) -> list[int | None]:
    return [None if s is None else step_seed(s, salt) for s in seeds]


def rejection_sample(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, seeds: Sequence[int | None],
                     offsets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of sampled proposals ``x [N]`` drawn from ``q [N, V]``, against the target's ``p [N, V]``.

    Returns (accepted ``[N]`` bool, token ``[N]``): ``x`` where accepted, else a
    draw from ``normalize(max(0, p - q))``. ``offsets[i]``: the output index of row i's token.
    """
    x = x.to(torch.int64).unsqueeze(1)
    px, qx = p.gather(1, x).squeeze(1), q.gather(1, x).squeeze(1)
    e = exponential_noise(px.unsqueeze(1), salted(seeds, _UNIFORM_SALT), offsets).squeeze(1)
    # u = exp(-e) is uniform on (0, 1]; u < p/q, without a division (q(x) > 0: x was drawn from q).
    accepted = torch.exp(-e) * qx < px
    residual = (p - q).clamp_(min=0)
    # Where p and q agree to rounding nothing is left (and the proposal was accepted): fall back to p.
    residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p)
    # The exponential race picks i with probability residual_i / sum(residual): no normalization needed.
    drawn = residual.div_(exponential_noise(residual, salted(seeds, _RESIDUAL_SALT), offsets)).argmax(1)
    return accepted, torch.where(accepted, x.squeeze(1), drawn)


def num_accepted(accepted: torch.Tensor, firsts: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """``[B]`` number of leading accepted rows of each request (``counts[i]`` proposals from row
    ``firsts[i]``; ``width`` >= every count), on the device."""
    cols = torch.arange(max(1, width), device=accepted.device)
    idx = (firsts.unsqueeze(1) + cols).clamp_(max=accepted.shape[0] - 1)
    flags = accepted[idx] & (cols < counts.unsqueeze(1))
    return flags.to(torch.int64).cumprod(1).sum(1)
