"""Batched sampling on the logits' device: one row per request that samples.

Order of operations (vLLM's):

1. raw logprobs = log_softmax(logits) in float32, only if some row asks;
2. logit_bias, then banned tokens -> -inf (EOS / stop ids while the output is
   shorter than min_tokens);
3. penalties: repetition (tokens seen in prompt or output: positive logits
   divided, negative multiplied), then frequency (x count) and presence
   (x seen) over the output;
4. greedy rows (temperature 0) take ``argmax`` of those logits: exactly what
   HF's greedy search picks (ties -> lowest id);
5. random rows: temperature, min_p, top_k, top_p; then one draw by the
   exponential race ``argmax(p_i / E_i)``, ``E_i ~ Exp(1)``, which picks i with
   probability p_i and needs no cumulative sum nor host sync.

Seeded rows draw their noise from a generator seeded by ``(seed,
seed_offset)``, where seed_offset counts the row's output tokens so far: the
token is a function of the request alone, whatever else is in the batch and
even if the request was preempted and recomputed. Unseeded rows share the
device's default generator.

Everything is vectorized over the batch except drawing the seeded rows'
noise; the host only reads Python-side flags built with the batch, never a
device value (no ``.item()``), so the step stays asynchronous until the runner
reads the sampled ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fleetlm.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# Smallest Exp(1) draw used; a draw of exactly 0 would turn a masked token's
# 0 / 0 into NaN, which argmax would pick.
_MIN_NOISE = 1e-20


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _to_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    # A non_blocking copy returns without waiting for the model's queued
    # kernels. It reads from pinned memory, which the driver can copy from
    # whenever the stream gets there (from pageable memory it may have to wait
    # for the stream first); the caching host allocator keeps the pinned block
    # until that copy is done.
    device = torch.device(device)
    host = torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def step_seed(seed: int, seed_offset: int) -> int:
    """The generator seed of a seeded row's draw number ``seed_offset`` (a 64-bit mix)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (seed_offset & _MASK64))


def min_tokens_banned_ids(
    params: SamplingParams, num_output_tokens: int, eos_token_ids: Sequence[int]
) -> list[int]:
    """Tokens to mask this step so that the output reaches ``min_tokens``:
    the stop token ids, plus EOS unless ``ignore_eos``; none once reached."""
    if num_output_tokens >= params.min_tokens:
        return []
    eos = [] if params.ignore_eos else list(eos_token_ids)
    return eos + list(params.stop_token_ids or [])


@dataclass
class SamplingRow:
    """One sampling request as the runner sees it this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    banned_token_ids: Sequence[int] = ()
    # Index of the token this row samples (seeded rows' draw number); None:
    # len(output_token_ids). With steps in flight it counts their tokens too.
    output_index: int | None = None


@dataclass
class SamplingBatch:
    """Per-row sampling state of one step, as tensors on the device plus host lists.

    Histories are only filled where a penalty reads them: ``prompt_token_ids``
    for rows with a repetition penalty, ``output_token_ids`` for rows with any
    penalty; other rows get ``[]`` (their penalties are neutral anyway).
    """

    temperature: torch.Tensor  # [B] float32, 0 for greedy rows
    top_p: torch.Tensor  # [B] float32, 1 = off
    top_k: torch.Tensor  # [B] int32, 0 = off
    min_p: torch.Tensor  # [B] float32, 0 = off
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    prompt_token_ids: list[Sequence[int]]
    output_token_ids: list[Sequence[int]]
    seeds: list[int | None]
    seed_offsets: list[int]
    banned_token_ids: list[Sequence[int]]
    logit_bias: list[dict[int, float] | None]
    num_logprobs: list[int | None]
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool = False
    no_top_p: bool = False
    no_min_p: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.seeds)

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], device: torch.device | str) -> SamplingBatch:
        temperature, top_p, top_k, min_p = [], [], [], []
        presence, frequency, repetition = [], [], []
        prompts, outputs, seeds, offsets = [], [], [], []
        for r in rows:
            p = r.params
            greedy = p.is_greedy
            temperature.append(0.0 if greedy else float(p.temperature))
            top_p.append(1.0 if greedy else float(p.top_p))
            top_k.append(0 if greedy or p.top_k < 0 else int(p.top_k))
            min_p.append(0.0 if greedy else float(p.min_p))
            presence.append(float(p.presence_penalty))
            frequency.append(float(p.frequency_penalty))
            repetition.append(float(p.repetition_penalty))
            has_rep = p.repetition_penalty != 1.0
            has_pen = has_rep or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            prompts.append(r.prompt_token_ids if has_rep else [])
            outputs.append(r.output_token_ids if has_pen else [])
            # Greedy rows draw no noise, so their seed is irrelevant.
            seeds.append(None if greedy else p.seed)
            offsets.append(len(r.output_token_ids) if r.output_index is None else r.output_index)

        # One host->device copy for all float parameters.
        floats = _to_device(
            [temperature, top_p, min_p, presence, frequency, repetition], torch.float32, device
        ).reshape(6, len(rows))
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=_to_device(top_k, torch.int32, device),
            min_p=floats[2],
            presence_penalty=floats[3],
            frequency_penalty=floats[4],
            repetition_penalty=floats[5],
            prompt_token_ids=prompts,
            output_token_ids=outputs,
            seeds=seeds,
            seed_offsets=offsets,
            banned_token_ids=[list(r.banned_token_ids) for r in rows],
            logit_bias=[r.params.logit_bias or None for r in rows],
            num_logprobs=[r.params.logprobs for r in rows],
            all_greedy=all(t == 0.0 for t in temperature),
            all_random=all(t != 0.0 for t in temperature),
            no_penalties=all(
                a == 0.0 and b == 0.0 and c == 1.0 for a, b, c in zip(presence, frequency, repetition)
            ),
            no_top_k=all(k == 0 for k in top_k),
            no_top_p=all(p >= 1.0 for p in top_p),
            no_min_p=all(m == 0.0 for m in min_p),
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # When some row asked for logprobs (else None): column 0 is the sampled
    # token, then the max_k most likely tokens; rows asking for k < max_k use
    # their first 1 + k columns. Logprobs are of the RAW logits.
    logprob_token_ids: torch.Tensor | None = None  # [B, 1 + max_k] int64
    logprobs: torch.Tensor | None = None  # [B, 1 + max_k] float32
    sampled_ranks: torch.Tensor | None = None  # [B] int64, 1 = most likely


def compute_topk_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather ``token_ids``' logprobs and the top ``k`` of each row.

    Returns ids ``[N, 1 + k]`` (the given token first), their logprobs ``[N, 1 + k]``
    and the given token's rank ``[N]`` (1 + number of strictly more likely tokens).
    Also usable for prompt logprobs (token_ids = the next prompt tokens).
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(-1)
    token_lp = logprobs.gather(-1, token_ids)
    ranks = (logprobs > token_lp).sum(-1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        return torch.cat([token_ids, top_ids], -1), torch.cat([token_lp, top_lp], -1), ranks
    return token_ids, token_lp, ranks


def _token_counts(histories: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 number of occurrences of each token in each row's history."""
    counts = torch.zeros(len(histories), vocab_size, dtype=torch.float32, device=device)
    lengths = [len(h) for h in histories]
    if sum(lengths):
        rows = _to_device([i for i, n in enumerate(lengths) for _ in range(n)], torch.int64, device)
        ids = _to_device(list(itertools.chain.from_iterable(histories)), torch.int64, device)
        counts.index_put_((rows, ids), torch.ones((), device=device), accumulate=True)
    return counts


def apply_logit_bias_and_bans(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place: add each row's logit_bias, then set its banned tokens to -inf."""
    rows, cols, vals = [], [], []
    for i, bias in enumerate(batch.logit_bias):
        if bias:
            rows += [i] * len(bias)
            cols += bias.keys()
            vals += bias.values()
    if rows:
        dev = logits.device
        index = (_to_device(rows, torch.int64, dev), _to_device(cols, torch.int64, dev))
        logits.index_put_(index, _to_device(vals, torch.float32, dev), accumulate=True)
    rows, cols = [], []
    for i, banned in enumerate(batch.banned_token_ids):
        rows += [i] * len(banned)
        cols += banned
    if rows:
        dev = logits.device
        index = (_to_device(rows, torch.int64, dev), _to_device(cols, torch.int64, dev))
        # A filled tensor, not a scalar: a scalar would cost a blocking copy.
        logits.index_put_(index, torch.full((len(rows),), float("-inf"), device=dev))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty on tokens seen in prompt or output (divide positive
    logits, multiply negative ones), then ``- frequency * count - presence *
    (count > 0)`` over the output. Rows with neutral penalties are unchanged
    bit for bit (x / 1, x - 0)."""
    vocab_size, dev = logits.shape[-1], logits.device
    out_counts = _token_counts(batch.output_token_ids, vocab_size, dev)
    out_seen = out_counts > 0
    seen = out_seen | (_token_counts(batch.prompt_token_ids, vocab_size, dev) > 0)
    rep = batch.repetition_penalty.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency_penalty.unsqueeze(1) * out_counts
    return logits - batch.presence_penalty.unsqueeze(1) * out_seen


def _apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask all but each row's top_k tokens, then all but the smallest set whose
    probability reaches top_p. Works in sorted order with a stable sort, so
    ties keep the lowest ids and top_k=1 keeps exactly the argmax."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab_size, device=logits.device)
    k = batch.top_k.to(torch.int64)
    k = torch.where(k > 0, k.clamp(max=vocab_size), vocab_size)
    drop = positions.unsqueeze(0) >= k.unsqueeze(1)
    if not batch.no_top_p:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Rows with top_p == 1 skip this: the cumsum's rounding could reach 1
        # before the tail and drop tokens that top_p=1 promises to keep.
        active = (batch.top_p < 1.0).unsqueeze(1)
        drop |= active & (mass_before >= batch.top_p.unsqueeze(1))
    drop = torch.empty_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(drop, float("-inf"))


def exponential_noise(like: torch.Tensor, seeds: Sequence[int | None], offsets: Sequence[int]) -> torch.Tensor:
    """Exp(1) draws shaped like ``like [B, ...]``: row i from a generator seeded by
    ``step_seed(seeds[i], offsets[i])``, or from the device's default one when unseeded."""
    noise = torch.empty_like(like)
    if any(s is None for s in seeds):
        noise.exponential_()
    for i, seed in enumerate(seeds):
        if seed is not None:
            gen = torch.Generator(device=like.device)
            gen.manual_seed(step_seed(seed, offsets[i]))
            noise[i].exponential_(generator=gen)
    return noise.clamp_(min=_MIN_NOISE)


def _exponential_noise(like: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    return exponential_noise(like, batch.seeds, batch.seed_offsets)


def _random_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution a random row draws from: temperature, min_p, top_k, top_p."""
    # Greedy rows of a mixed batch go through here too (their result is
    # discarded); temperature 1 keeps their arithmetic finite.
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    logits = logits / temperature.unsqueeze(1)
    if not batch.no_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if not (batch.no_top_k and batch.no_top_p):
        logits = _apply_top_k_top_p(logits, batch)
    return logits.softmax(dim=-1)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    probs = _random_probs(logits, batch)
    return probs.div_(_exponential_noise(probs, batch)).argmax(dim=-1)


def _adjusted_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Float32 logits after logit_bias, bans and penalties (a copy only when something edits them)."""
    edits = any(batch.logit_bias) or any(batch.banned_token_ids) or not batch.no_penalties
    # Copy only when editing in place: the caller's tensor stays intact.
    logits = logits.to(torch.float32, copy=edits)
    if edits:
        apply_logit_bias_and_bans(logits, batch)
    if not batch.no_penalties:
        logits = apply_penalties(logits, batch)
    return logits


class Sampler:
    """Stateless; one instance per model runner."""

    def probabilities(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """``[B, V]`` float32: the distribution each row samples from (one-hot at the argmax for
        greedy rows). Speculative decoding's rejection sampling compares these."""
        logits = _adjusted_logits(logits, batch)
        greedy = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(torch.float32)
        if batch.all_greedy:
            return greedy
        probs = _random_probs(logits, batch)
        return probs if batch.all_random else torch.where((batch.temperature == 0).unsqueeze(1), greedy, probs)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of ``logits [B, V]``; ``logits`` is not modified."""
        want = [k for k in batch.num_logprobs if k is not None]
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want else None
        logits = _adjusted_logits(logits, batch)

        if batch.all_greedy:
            sampled = logits.argmax(dim=-1)
        elif batch.all_random:
            sampled = _sample_random(logits, batch)
        else:
            greedy = logits.argmax(dim=-1)
            sampled = torch.where(batch.temperature == 0, greedy, _sample_random(logits, batch))

        if raw_logprobs is None:
            return SamplerOutput(sampled)
        ids, lps, ranks = compute_topk_logprobs(raw_logprobs, sampled, max(want))
        return SamplerOutput(sampled, ids, lps, ranks)
