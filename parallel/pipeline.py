"""Stage-to-stage transfer of (hidden, residual) between pipeline stages.

Between stages the Llama stack's state is two ``[num_tokens, hidden_size]``
tensors: the hidden states and the residual stream (the next stage's first
layer fuses the residual add into its input RMSNorm). They travel as ONE
``[2, num_tokens, hidden_size]`` message in the model's dtype (one send per
step and stage instead of two), from each TP rank of a stage to the same TP
rank of the next stage, over the replica's world group (NCCL on GPU, gloo on
CPU): the Ray object store never sees them.

Both sides know the shape without a handshake: every worker gets the step's
``SchedulerOutput``, whose ``num_batched_tokens`` is the token count, and
the model config gives ``hidden_size`` and dtype. Bytes per step and stage
boundary: ``2 * num_tokens * hidden_size * elem`` per TP rank (for example
8192 tokens x 4096 x bf16 = 128 MiB during a full prefill step, 64 KiB for a
decode step of 8 requests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fleetlm.parallel.context import ParallelContext


def send_to_next_stage(ctx: ParallelContext, hidden: torch.Tensor, residual: torch.Tensor) -> None:
    if ctx.pp_next_rank is None:
        raise RuntimeError("the last pipeline stage has no next stage to send to")
    if hidden.shape != residual.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and residual {tuple(residual.shape)} differ in shape")
    dist.send(torch.stack((hidden, residual)), dst=ctx.pp_next_rank, group=ctx.pp_group)


def recv_from_prev_stage(
    ctx: ParallelContext, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.pp_prev_rank is None:
        raise RuntimeError("the first pipeline stage has no previous stage to receive from")
    buf = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
    dist.recv(buf, src=ctx.pp_prev_rank, group=ctx.pp_group)
    return buf[0], buf[1]
