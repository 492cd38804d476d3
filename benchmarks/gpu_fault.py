"""Kill a replica mid-generation on GPUs: streams continue, identical, and how long they pause.

    python benchmarks/gpu_fault.py --out benchmarks/results            # 2 GPUs, 2 TP=1 replicas, 8B dummy
    python benchmarks/gpu_fault.py --cpu-smoke --out /tmp/fault        # the same steps on CPU, small model

Starts a local Ray cluster with Serve here (``fleetlm.benchmarks.drill.local_app``) and deploys
2 replicas of the model (one GPU each: ``llama-3.1-8b``, ``load_format: dummy``,
bfloat16). Then:

1. reference: ``--streams`` greedy streaming completions (``ignore_eos``,
   ``--max-tokens`` each, per-token strings through ``logprobs: 0``), undisturbed;
2. the same streams again; once every one has at least ``--kill-after-tokens``
   tokens, the replica running the most of them is killed (``ray.kill`` of its actor:
   the process and its CUDA context are gone); the ingress migrates its streams to the
   other replica with the tokens already sent;
3. checks: every stream complete, no error event, text and per-token strings equal to
   the reference; time to resume per stream (the gap between the last token before the
   kill and the first after it; the streams that were on the killed replica are the
   ``migrated`` largest gaps); Serve's replacement replica up; the ledger balanced
   (``fleetlm_requests_accepted_total`` == sum of ``..._finished_total``) and every
   engine idle with all KV blocks free (``/debug/invariants``).

Writes ``gpu-fault-<date>.json`` (card, date, commit, settings, figures) into
``--out`` and prints a short table. Every wait is bounded; ``--budget-s`` bounds the
whole run (default 300 s). Exit status 0 only if every check passed.

Comparability: with random (dummy) weights in bfloat16 the logits are nearly flat, so
two *undisturbed* runs already differ wherever a batch of another size or a prefix-cache
hit changes the kernels' arithmetic (a first H100 run differed at token 1 of some
streams, before any kill). So the undisturbed run is done twice (after a warm-up of the
same prompts, so every run sees the same cache hits): if those two agree, the disturbed
run must equal them token for token; if they already differ, equality cannot be judged
at that dtype, the record says so (``outputs_comparable: false``, the noise floor) and
only completeness is required. ``--dtype float32`` (the 8B model fits one 80 GB card)
makes the runs comparable. The text, the token count and the per-token strings are
compared; a mismatch is reported with the first position where the streams differ.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from fleetlm.benchmarks.records import git_commit

KEY = "gpu-fault-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = ("rivers mountains deserts forests islands cities caves glaciers meadows canyons reefs volcanoes "
         "swamps valleys plains lakes harbors orchards dunes fjords tundras marshes mesas atolls").split()


def _card(cpu: bool) -> str:
    if cpu:
        return f"cpu ({os.cpu_count()} cores)"
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{n} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - describe what we can
        pass
    return "unknown"


def app_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.cpu_smoke:
        model = {"model": "smollm2-135m-instruct", "device": "cpu", "max_model_len": 256, "max_num_seqs": 16}
    else:
        model = {"model": ns.model, "load_format": "dummy", "dtype": ns.dtype, "device": "cuda",
                 "max_model_len": ns.max_model_len, "max_num_seqs": max(16, ns.streams)}
    return {"models": [{**model, "num_replicas": 2}], "api_key": KEY, "max_logprobs": 1}


def bodies(model: str, n: int, max_tokens: int) -> list[dict[str, Any]]:
    return [{"model": model, "prompt": f"Story {i}: once upon a time, in a land of {WORDS[i % len(WORDS)]},",
             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0,
             "stream_options": {"include_usage": True}} for i in range(n)]


def first_difference(a: list[str], b: list[str]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from fleetlm.benchmarks import drill

    t_begin = time.monotonic()
    deadline = t_begin + ns.budget_s

    def left(cap: float) -> float:
        return max(1.0, min(cap, deadline - time.monotonic()))

    args = app_args(ns)
    model = args["models"][0]["model"]
    reqs = bodies(model, ns.streams, ns.max_tokens)
    record: dict[str, Any] = {"checks": {}}
    num_cpus = 4 if ns.cpu_smoke else max(4, os.cpu_count() or 4)
    with drill.local_app(args, num_cpus=num_cpus, startup_timeout_s=left(240)) as base:
        record["startup_s"] = round(time.monotonic() - t_begin, 1)
        # Warm-up with the same prompts: first-request costs (CUDA graphs) and the prompts'
        # prefix-cache entries, so every later run takes the same kernel paths.
        asyncio.run(drill.run_streams(base, reqs, AUTH, timeout_s=left(120)))
        t0 = time.monotonic()
        reference = asyncio.run(drill.run_streams(base, reqs, AUTH, timeout_s=left(180)))
        record["reference_s"] = round(time.monotonic() - t0, 2)
        again = asyncio.run(drill.run_streams(base, reqs, AUTH, timeout_s=left(180)))
        floor = [i for i, (a, b) in enumerate(zip(reference, again)) if a.tokens != b.tokens or a.text != b.text]
        comparable = not floor
        record["undisturbed_runs_differ"] = {"streams": len(floor), "first_difference": {
            i: first_difference(reference[i].tokens, again[i].tokens) for i in floor}}
        record["outputs_comparable"] = comparable
        ref_ok = all(r.done and not r.errors and len(r.tokens) == ns.max_tokens for r in reference + again)
        record["checks"]["reference_complete"] = ref_ok
        migrated_before = drill.debug_invariants(base, AUTH)["ledger"][model]["migrated"]
        workers_before = drill.worker_actor_pids()
        kill: dict[str, Any] = {}

        async def kill_when_streaming(live: list[drill.StreamResult]) -> None:
            stop = time.monotonic() + left(120)
            while min(len(s.tokens) for s in live) < ns.kill_after_tokens:
                if time.monotonic() > stop or all(s.done for s in live):
                    kill["skipped"] = "streams never reached the kill point"
                    return
                await asyncio.sleep(0.01)
            kill["tokens_before"] = [len(s.tokens) for s in live]
            if ns.kill == "replica":
                kill.update(await asyncio.to_thread(drill.kill_busiest_replica, base, model, AUTH))
            else:
                kill.update(drill.kill_one_worker(workers_before[0]))
            kill["t"] = time.monotonic()

        t0 = time.monotonic()
        disturbed = asyncio.run(drill.run_streams(base, reqs, AUTH, on_progress=kill_when_streaming,
                                                  timeout_s=left(240)))
        record["disturbed_s"] = round(time.monotonic() - t0, 2)
        t_kill = kill.get("t")
        mismatches = []
        for i, (ref, got) in enumerate(zip(reference, disturbed)):
            same = got.tokens == ref.tokens and got.text == ref.text
            complete = got.done and not got.errors and got.finish_reason == "length" \
                and len(got.tokens) == ns.max_tokens and not got.timed_out
            if not (same and complete):
                mismatches.append({"stream": i, "complete": complete, "errors": got.errors[:2],
                                   "tokens": len(got.tokens), "first_difference": first_difference(ref.tokens,
                                                                                                  got.tokens)})
        gaps = [g for s in disturbed if t_kill is not None and (g := s.gap_around(t_kill)) is not None]
        # After the kill: the app replaces the replica, then is idle and clean.
        t0 = time.monotonic()
        inv = drill.wait_idle(base, AUTH, model=model, replicas=2, timeout_s=left(180))
        record["replaced_and_idle_after_s"] = round(time.monotonic() - t0, 1)
        ledger = inv.get("ledger", {}).get(model, {})
        metrics = drill.metric_ledger(base)
        migrated = ledger.get("migrated", 0) - migrated_before
        top = sorted(gaps, reverse=True)[:max(0, migrated)]
        record.update({
            "kill": {k: v for k, v in kill.items() if k != "t"},
            "streams": ns.streams, "max_tokens": ns.max_tokens,
            "migrated_streams": migrated,
            "resume_gap_all_streams_s": {"p50": _r(drill.percentile(gaps, 50)), "max": _r(max(gaps, default=None))},
            "resume_gap_migrated_streams_s": {"p50": _r(drill.percentile(top, 50)), "max": _r(max(top, default=None)),
                                              "values": [_r(g) for g in top]},
            "reference_ttft_p50_s": _r(drill.percentile([r.ttft_s for r in reference if r.ttft_s], 50)),
            "mismatches": mismatches,
            "ledger": ledger, "metrics_ledger": metrics,
            "invariants_ok": bool(inv.get("ok")),
            "replicas_after": [r.get("replica") for r in inv.get("models", {}).get(model, {}).get("replicas", [])],
        })
        record["checks"].update({
            "killed_mid_generation": "tokens_before" in kill and max(kill["tokens_before"]) < ns.max_tokens,
            # Equality only where two undisturbed runs agree (see the docstring).
            "outputs_identical_and_complete": not mismatches if comparable
            else not [m for m in mismatches if not m["complete"]],
            "some_stream_migrated": migrated >= 1,
            "ledger_balanced": bool(ledger.get("balanced")) and metrics["balanced"],
            "invariants_hold": bool(inv.get("ok")),
        })
    record["wall_s"] = round(time.monotonic() - t_begin, 1)
    record["passed"] = all(record["checks"].values())
    return record


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the JSON record")
    p.add_argument("--cpu-smoke", action="store_true", help="embedded smollm2-135m-instruct on CPU")
    p.add_argument("--model", default="llama-3.1-8b", help="configs/models/<name> (dummy weights)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="float32 makes greedy tokens independent of batch composition (bf16 near-ties flip)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="default 256 (GPU) / 32 (CPU smoke)")
    p.add_argument("--kill-after-tokens", type=int, default=None, help="default 16 (GPU) / 4 (CPU smoke)")
    p.add_argument("--kill", choices=("replica", "worker"), default="replica",
                   help="replica: ray.kill the busiest replica actor; worker: SIGKILL one worker actor (TP/PP > 1)")
    p.add_argument("--budget-s", type=float, default=300.0, help="bound on the whole run")
    ns = p.parse_args(argv)
    if ns.max_tokens is None:
        ns.max_tokens = 32 if ns.cpu_smoke else 256
    if ns.kill_after_tokens is None:
        ns.kill_after_tokens = 4 if ns.cpu_smoke else 16

    record: dict[str, Any] = {
        "benchmark": "gpu_fault" if not ns.cpu_smoke else "gpu_fault_cpu_smoke",
        "card": _card(ns.cpu_smoke),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(ns).items() if k != "out"},
    }
    try:
        record.update(run(ns))
    except Exception as e:  # noqa: BLE001 - a record of the failure is still a record
        record.update({"passed": False, "error": f"{type(e).__name__}: {e}"})
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"{record['benchmark'].replace('_', '-')}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")

    rows = [("card", record["card"]), ("passed", record.get("passed")),
            ("streams / migrated", f"{record.get('streams')} / {record.get('migrated_streams')}"),
            ("resume gap, migrated p50 / max (s)",
             f"{record.get('resume_gap_migrated_streams_s', {}).get('p50')} / "
             f"{record.get('resume_gap_migrated_streams_s', {}).get('max')}"),
            ("resume gap, all streams p50 / max (s)",
             f"{record.get('resume_gap_all_streams_s', {}).get('p50')} / "
             f"{record.get('resume_gap_all_streams_s', {}).get('max')}"),
            ("outputs identical", record.get("checks", {}).get("outputs_identical_and_complete")
             if record.get("outputs_comparable", True) else
             f"not comparable: 2 undisturbed runs differ in {record['undisturbed_runs_differ']['streams']} "
             f"streams; {len(record.get('mismatches', []))} differ from the reference"),
            ("ledger balanced", record.get("checks", {}).get("ledger_balanced")),
            ("invariants hold", record.get("checks", {}).get("invariants_hold")),
            ("replaced + idle after (s)", record.get("replaced_and_idle_after_s")),
            ("wall (s)", record.get("wall_s")), ("error", record.get("error"))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {path}")
    return 0 if record.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
