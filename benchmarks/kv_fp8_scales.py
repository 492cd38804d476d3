"""Which scales for an E4M3 KV cache? Quality of each granularity, measured through the engine (CPU).

    python benchmarks/kv_fp8_scales.py [--out DIR] [--modes tensor1,head_bound,token]

The embedded model in float32 reads the fixed public-domain text (``tests/data``) with
``prompt_logprobs`` and answers 8 chat prompts greedily, once with a float32 cache and once per
scale scheme. Each scheme is simulated exactly: every K/V row the engine stores is quantized to
E4M3 with that scheme's scales and dequantized back (the float32 cache then holds exactly what an
E4M3 cache would give the attention). Reported per scheme: perplexity, mean and 99th-percentile
KL(float32 || scheme) of the next-token distribution over the text's positions, top-1 agreement,
and where each greedy answer first departs from the float32 one.

Schemes: ``bf16`` (a bf16 cache, for scale); ``tensor1`` (one scale of 1.0: vLLM's default without
calibration); ``tensor_cal`` / ``head_cal`` (per layer / per KV head, amax of the chat prompts /
448: calibrated on other text than the scored one) and their ``_p2m2`` variants (rounded up to a
power of two with 2x headroom); ``head_oracle`` (per head, calibrated on the scored text itself);
``head_bound`` (what FleetLM ships: per head, the power of two above the weight bound,
``workers/kv_cache.py``); ``token`` / ``token_pow2`` (per token and head, dynamic: amax / 448,
exact or rounded up to a power of two). Writes ``kv-fp8-scales-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FMAX = 448.0
MODES = ("bf16", "tensor1", "tensor_cal", "tensor_cal_p2m2", "head_cal", "head_cal_p2m2", "head_oracle",
         "head_bound", "token", "token_pow2")
PROMPTS = ["Write a short story about a robot who learns to paint.", "What is the capital of France?",
           "Explain how a steam engine works.", "List five prime numbers and explain why they are prime.",
           "Translate 'good morning' into Spanish, French and German.", "Who wrote Hamlet?",
           "Describe the water cycle.", "Give me a recipe for pancakes."]


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x)))


def _qdq(x: torch.Tensor, scale) -> torch.Tensor:
    return (x / scale).clamp(-FMAX, FMAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


class Schemes:
    """The store op of every layer, quantizing what it stores by the current mode."""

    def __init__(self, layers, ops):
        from fleetlm.workers.kv_cache import kv_scales

        self.mode, self.collect = "none", None  # collect: name of the amax table being filled
        self.amax: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        self.bound = {i: dict(zip("kv", kv_scales(layer))) for i, layer in enumerate(layers)}
        self.ops = ops
        for i, layer in enumerate(layers):
            layer.self_attn.attn.ops = dataclasses.replace(ops, store_kv_cache=self._store(i))

    def _store(self, layer: int):
        def store(k, v, *rest):
            return self.ops.store_kv_cache(self._apply(k, layer, "k"), self._apply(v, layer, "v"), *rest)
        return store

    def _apply(self, x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        if self.collect is not None:
            table = self.amax.setdefault(self.collect, {})
            seen = x.abs().amax(dim=(0, 2))
            table[layer, which] = torch.maximum(table[layer, which], seen) if (layer, which) in table else seen
        mode = self.mode
        if mode == "none":
            return x
        if mode == "bf16":
            return x.to(torch.bfloat16).to(x.dtype)
        if mode == "tensor1":
            return _qdq(x, 1.0)
        if mode == "head_bound":
            return _qdq(x, self.bound[layer][which].view(1, -1, 1))
        if mode.startswith(("tensor_cal", "head_cal", "head_oracle")):
            a = self.amax["text" if mode == "head_oracle" else "chat"][layer, which]
            scale = (a.max() if mode.startswith("tensor") else a.view(1, -1, 1)) / FMAX
            return _qdq(x, _pow2_ceil(2 * scale) if mode.endswith("_p2m2") else scale)
        if mode in ("token", "token_pow2"):
            scale = (x.abs().amax(dim=2, keepdim=True) / FMAX).clamp_min(1e-30)
            return _qdq(x, _pow2_ceil(scale) if mode == "token_pow2" else scale)
        raise ValueError(f"unknown mode {mode!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results directory (default: $OUT, else benchmarks/results)")
    p.add_argument("--modes", default=",".join(MODES))
    ns = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
    from perplexity import perplexity, text_token_ids

    from fleetlm import LLM, SamplingParams

    llm = LLM(model="smollm2-135m-instruct", device="cpu", dtype="float32", enable_prefix_caching=False,
              cpu_kv_cache_bytes=256 << 20)
    runner = llm.engine.workers.worker.runner
    schemes = Schemes(runner.model.layers, runner.ops)
    captured: list[torch.Tensor] = []
    compute_logits = runner.model.compute_logits

    def capture(hidden):
        logits = compute_logits(hidden)
        if hidden.shape[0] > len(PROMPTS):  # the text's prompt positions, not the chat's sampled rows
            captured.append(logits.float().log_softmax(-1))
        return logits

    runner.model.compute_logits = capture
    ids = text_token_ids(llm.get_tokenizer(), 10_000)
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    chats = [[{"role": "user", "content": q}] for q in PROMPTS]

    def run(mode: str, calibrate: bool = False):
        schemes.mode = mode
        captured.clear()
        schemes.collect = "text" if calibrate else None  # amax of the scored text alone ...
        ppl = perplexity(llm, ids)
        logprobs = torch.cat(captured)
        schemes.collect = "chat" if calibrate else None  # ... and of the chat prompts alone
        answers = [o.outputs[0].token_ids for o in llm.chat(chats, greedy)]
        schemes.collect = None
        return ppl, logprobs, answers

    base_ppl, base_lp, base_answers = run("none", calibrate=True)
    rows = {"float32": {"perplexity": round(base_ppl, 4)}}
    print(f"{'scheme':16s} {'ppl':>8s} {'vs fp32':>8s} {'KL mean':>9s} {'KL p99':>8s} {'top-1':>6s}  first departure")
    print(f"{'float32':16s} {base_ppl:8.4f}")
    for mode in [m for m in ns.modes.split(",") if m]:
        t0 = time.perf_counter()
        ppl, lp, answers = run(mode)
        kl = (base_lp.exp() * (base_lp - lp)).sum(-1)
        top1 = (base_lp.argmax(-1) == lp.argmax(-1)).float().mean().item()
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(base_answers, answers)]
        rows[mode] = {"perplexity": round(ppl, 4), "perplexity_change_pct": round(100 * (ppl / base_ppl - 1), 3),
                      "kl_mean": round(kl.mean().item(), 5), "kl_p99": round(kl.quantile(0.99).item(), 5),
                      "top1_agreement": round(top1, 4), "greedy_first_departure": first,
                      "seconds": round(time.perf_counter() - t0, 1)}
        r = rows[mode]
        print(f"{mode:16s} {ppl:8.4f} {r['perplexity_change_pct']:+7.3f}% {r['kl_mean']:9.5f} {r['kl_p99']:8.5f} "
              f"{100 * top1:5.1f}%  {first}", flush=True)
    out_dir = Path(ns.out or os.environ.get("OUT") or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    record = {"benchmark": "kv-fp8-scales", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "config": {"model": "smollm2-135m-instruct", "dtype": "float32", "device": "cpu",
                         "text_tokens": len(ids), "greedy": f"{len(PROMPTS)} chat prompts x 64 tokens"},
              "figures": rows}
    path = out_dir / f"kv-fp8-scales-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0 if all(math.isfinite(r["perplexity"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
