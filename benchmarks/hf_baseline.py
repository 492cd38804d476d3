"""Hugging Face transformers baselines on FleetLM's own (dummy) weights.

    python benchmarks/hf_baseline.py parity --model llama-3.1-8b --output hf_parity.json
    python benchmarks/hf_baseline.py batch  --model llama-3.1-8b --num-requests 256 --input-len 512 --output-len 128

``parity``: greedy continuations of ``parity_prompts(...)`` (seeded random
token ids of varied lengths) by ``transformers.LlamaForCausalLM`` built from
the model's config and loaded with exactly the tensors FleetLM loads
(``fleetlm.workers.loader.iter_weights``; dummy weights are deterministic per
name and device type). It records, per step, the reference's top-k token ids
and logits, so a divergence from the engine can be judged by the reference's
margin there. Greedy decoding is a plain loop over ``forward`` with the KV
cache (what ``generate`` does for greedy), which keeps EOS out of it: the
engine runs with ``ignore_eos``.

``batch``: ``model.generate_batch`` (transformers' continuous batching) over
random prompts, timed; figures include its own warm-up (CUDA graph capture)
and the span of the requests alone.

``compare_greedy`` (used by ``benchmarks/gpu_suite.py`` and
``tests/gpu/test_engine_gpu.py``) compares engine tokens with a reference.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PARITY_PROMPT_LENS = (5, 17, 32, 64, 100, 128, 200, 333)
TOP_K = 10
# A greedy divergence is accepted when the engine's token is within this many
# logits of the reference's top token there. bf16 logits of magnitude 4..8 (what
# dummy weights give) are spaced 1/32 apart, and the two implementations round
# differently through 32 layers: ~3 spacings. A first guess, to revisit with data.
PARITY_GAP_TOL = 0.1


def parity_prompts(vocab_size: int, num_prompts: int = 8, seed: int = 0) -> list[list[int]]:
    """``num_prompts`` random token-id prompts of varied lengths (cycling ``PARITY_PROMPT_LENS``)."""
    gen = torch.Generator().manual_seed(seed)
    low = 10 if vocab_size > 1000 else 0
    return [
        torch.randint(low, vocab_size, (PARITY_PROMPT_LENS[i % len(PARITY_PROMPT_LENS)],), generator=gen).tolist()
        for i in range(num_prompts)
    ]


def build_hf_model(model: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, load_format: str = "dummy"):
    """``LlamaForCausalLM`` of ``model``'s config, holding the tensors FleetLM's loader yields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fleetlm.workers.loader import iter_weights, resolve_model

    source = resolve_model(model, load_format)
    cfg = {k: v for k, v in source.hf_config.items() if k not in ("architectures", "quantization_config")}
    config = LlamaConfig(**cfg)
    with torch.device(device):
        try:
            hf = LlamaForCausalLM._from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            hf = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    # No hf.to(dtype): it would also cast the rotary inv_freq buffer, which transformers
    # keeps in float32 (from_pretrained does not cast it either).
    params = dict(hf.named_parameters())
    wrong = [n for n, p in params.items() if p.dtype != dtype or p.device.type != torch.device(device).type]
    if wrong:
        raise RuntimeError(f"parameters not built as {dtype} on {device}: {wrong[:3]}")
    loaded = set()
    with torch.no_grad():
        for name, lazy in iter_weights(source, device=device, dtype=dtype):
            if name not in params:
                raise KeyError(f"FleetLM yields {name!r}, which the HF model does not have")
            params[name].copy_(lazy.load())
            loaded.add(name)
    missing = set(params) - loaded
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")  # shares model.embed_tokens.weight
        hf.tie_weights()
    if missing:
        raise KeyError(f"no weights loaded for {sorted(missing)[:5]}")
    return hf.eval()


def _cache_kwarg(model) -> str:
    """The forward kwarg that takes the KV cache: ``cache`` in newer transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_reference(model, prompts: list[list[int]], max_tokens: int, top_k: int = TOP_K) -> list[dict[str, Any]]:
    """For each prompt (run alone): greedy tokens and, per step, the top-k ids and logits (float32)."""
    cache_kw = _cache_kwarg(model)
    device = next(model.parameters()).device
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        cache = None
        tokens, top_ids, top_logits = [], [], []
        for _ in range(max_tokens):
            kwargs = {"input_ids": ids, "use_cache": True, "logits_to_keep": 1}
            if cache is not None:
                kwargs[cache_kw] = cache
            out = model(**kwargs)
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = out.past_key_values
            logits = out.logits[0, -1].float()
            values, indices = torch.topk(logits, top_k)
            token = int(torch.argmax(logits))  # first maximum, as the engine's greedy sampler
            tokens.append(token)
            top_ids.append(indices.tolist())
            top_logits.append(values.tolist())
            ids = torch.tensor([[token]], device=device)
        results.append({"prompt": prompt, "tokens": tokens, "top_ids": top_ids, "top_logits": top_logits})
    return results


def compare_greedy(reference: list[dict[str, Any]], engine_tokens: list[list[int]],
                   engine_logprobs: list[list[dict[int, Any]] | None] | None = None) -> dict[str, Any]:
    """Token-by-token comparison; at each prompt's first divergence, the reference's
    margin (top1 - top2 logit), the gap between its top1 and the engine's token
    (None when that token is not in its top-k), that token's rank there, and the
    engine's own top1 - top2 margin when its logprobs are given."""
    per_prompt = []
    for i, (ref, got) in enumerate(zip(reference, engine_tokens)):
        want = ref["tokens"]
        n = min(len(want), len(got))
        div = next((j for j in range(n) if want[j] != got[j]), None)
        entry: dict[str, Any] = {"prompt_len": len(ref["prompt"]), "num_tokens": len(want),
                                 "matched_tokens": n if div is None else div, "diverged_at": div}
        if div is None and len(got) != len(want):
            entry["length_mismatch"] = [len(want), len(got)]
        if div is not None:
            ids, logits = ref["top_ids"][div], ref["top_logits"][div]
            entry["ref_token"], entry["engine_token"] = want[div], got[div]
            entry["ref_margin"] = logits[0] - logits[1]
            rank = ids.index(got[div]) if got[div] in ids else None
            entry["engine_token_ref_rank"] = rank  # 0-based; None: outside the reference's top-k
            entry["ref_gap_to_engine_token"] = logits[0] - logits[rank] if rank is not None else None
            if engine_logprobs is not None and engine_logprobs[i] is not None and div < len(engine_logprobs[i]):
                lps = sorted((lp.logprob if hasattr(lp, "logprob") else float(lp)
                              for lp in engine_logprobs[i][div].values()), reverse=True)
                entry["engine_margin"] = lps[0] - lps[1] if len(lps) > 1 else None
        per_prompt.append(entry)
    total = sum(e["num_tokens"] for e in per_prompt)
    matched = sum(e["matched_tokens"] for e in per_prompt)
    margins = [e["ref_margin"] for e in per_prompt if e["diverged_at"] is not None]
    return {
        "num_prompts": len(per_prompt),
        "prompts_identical": sum(1 for e in per_prompt if e["diverged_at"] is None and "length_mismatch" not in e),
        "tokens_matched": matched,
        "tokens_total": total,
        "max_ref_margin_at_divergence": max(margins) if margins else None,
        "per_prompt": per_prompt,
    }


def run_generate_batch(model, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Time ``model.generate_batch`` (continuous batching) on ``prompts``; greedy, EOS disabled."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers has no generate_batch"}
    gen_cfg = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kwargs: dict[str, Any] = {"generation_config": gen_cfg}
    if "progress_bar" in inspect.signature(model.generate_batch).parameters:
        kwargs["progress_bar"] = False
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    outs = list(results.values())
    out_tokens = sum(len(r.generated_tokens) for r in outs)
    errors = sum(1 for r in outs if getattr(r, "error", None))
    figures: dict[str, Any] = {
        "elapsed_s": elapsed,
        "num_requests": len(prompts),
        "num_finished": len(outs) - errors,
        "errors": errors,
        "output_tokens": out_tokens,
        "requests_per_s": (len(outs) - errors) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + sum(len(p) for p in prompts)) / elapsed,
        "note": "elapsed includes generate_batch's own warm-up (CUDA graph capture) and manager start/stop",
    }
    # The requests' own span, from the first creation to the last finish (perf_counter clock).
    try:
        created = min(r.created_time for r in outs)
        finished = max(r.lifespan[1] for r in outs)
        if finished > created:
            figures["requests_span_s"] = finished - created
            figures["output_tokens_per_s_requests_span"] = out_tokens / (finished - created)
    except (AttributeError, TypeError, ValueError):
        pass
    return figures


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _write(obj: dict[str, Any], output: str | None) -> None:
    text = json.dumps(obj, indent=1)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("parity", "batch"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="llama-3.1-8b")
        p.add_argument("--load-format", default="dummy")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--output")
        if name == "parity":
            p.add_argument("--num-prompts", type=int, default=8)
            p.add_argument("--max-tokens", type=int, default=32)
        else:
            p.add_argument("--num-requests", type=int, default=256)
            p.add_argument("--input-len", type=int, default=512)
            p.add_argument("--output-len", type=int, default=128)
    ns = parser.parse_args(argv)
    dtype = _dtype(ns.dtype or ("bfloat16" if ns.device == "cuda" else "float32"))
    t0 = time.perf_counter()
    model = build_hf_model(ns.model, ns.device, dtype, ns.load_format)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    card = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    info = {"model": ns.model, "device": ns.device, "card": card, "dtype": str(dtype).removeprefix("torch."),
            "load_s": load_s, "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    if ns.cmd == "parity":
        prompts = parity_prompts(vocab, ns.num_prompts, ns.seed)
        t1 = time.perf_counter()
        ref = greedy_reference(model, prompts, ns.max_tokens)
        _write({**info, "max_tokens": ns.max_tokens, "seconds": time.perf_counter() - t1, "reference": ref}, ns.output)
    else:
        gen = torch.Generator().manual_seed(ns.seed)
        low = 10 if vocab > 1000 else 0
        prompts = torch.randint(low, vocab, (ns.num_requests, ns.input_len), generator=gen).tolist()
        figures = run_generate_batch(model, prompts, ns.output_len)
        _write({**info, "num_requests": ns.num_requests, "input_len": ns.input_len, "output_len": ns.output_len,
                "figures": figures}, ns.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
