"""One device's worker: owns its model shard, its KV cache and its model runner.

In a replica of TP x PP workers each runs as a Ray actor (see
``fleetlm.workers.worker_group``); with one device the same class runs in the
engine's own process. The worker never knows about HTTP, routing or other
replicas.
"""

from __future__ import annotations

import time

import torch

from fleetlm.engine.config import EngineConfig
from fleetlm.parallel.context import SINGLE, ParallelContext
from fleetlm.workers.compile_cache import settings_fingerprint, use_compile_cache
from fleetlm.workers.loader import iter_weights, resolve_model
from fleetlm.workers.model_runner import DTYPES, ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, ctx: ParallelContext = SINGLE, device: str | None = None) -> None:
        self.config = config
        self.ctx = ctx
        dev = device or ("cuda:0" if config.parallel.device == "cuda" else "cpu")
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.compile_cache = None
        if config.compile_cache_dir is not None:  # before anything compiles
            self.compile_cache = use_compile_cache(config.compile_cache_dir, self.device, settings_fingerprint(config))
        torch.manual_seed(config.model.seed)
        sc = config.scheduler
        # Rows of the largest forward: a full step, or a CUDA graph's padded batch (of up to 8 tokens each).
        max_rows = max(sc.max_num_batched_tokens, 8 * sc.max_num_seqs)
        self.runner = ModelRunner(config.model, config.cache, ctx, self.device, config.lora, max_rows)
        if config.warmup and self.runner.lora is not None:
            self.runner.lora.warm_up()
        # One stage of several TP ranks may get steps launched ahead: see ModelRunner.share_samples.
        self.runner.share_samples = ctx.tp_size > 1 and ctx.pp_size == 1

    def load_model(self) -> float:
        """Load this worker's shard of the weights; returns seconds taken."""
        t0 = time.perf_counter()
        mc = self.config.model
        source = resolve_model(mc.model, "dummy" if mc.kind == "dummy" else "auto")
        weights = iter_weights(source, device=self.device, dtype=DTYPES[mc.dtype], seed=mc.seed,
                               keep_quantized=mc.quantization == "gguf")
        self.runner.load_weights(weights)
        # The bytes that now sit on the device (a tied weight once): over the seconds, the load's GB/s.
        tensors = {t.data_ptr(): t for t in self.runner.model.state_dict().values()}
        self.weights_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return time.perf_counter() - t0

    def num_available_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_blocks is not None:
            return cc.num_blocks
        per_block = self.runner.kv_bytes_per_block()
        if self.device.type != "cuda":
            # The CPU budget is the replica's: its KV is split over the workers.
            budget = cc.cpu_kv_cache_bytes // self.config.parallel.world_size
        else:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            used = total - free
            budget = int(total * cc.gpu_memory_utilization) - used - self._activation_reserve()
        blocks = budget // per_block
        max_useful = self.config.scheduler.max_num_seqs * -(-self.config.model.max_model_len // cc.block_size)
        return int(max(0, min(blocks, max_useful)))

    def _activation_reserve(self) -> int:
        """Peak bytes of one step's activations at the full token budget (an upper estimate).

        Largest live set: the MLP's gate_up output plus a few hidden-sized
        buffers per token, and float32 logits with sampling scratch for the
        sampled rows.
        """
        mc, sc = self.config.model, self.config.scheduler
        elem = torch.tensor([], dtype=DTYPES[mc.dtype]).element_size()
        inter = int(mc.get("intermediate_size")) // self.ctx.tp_size
        per_token = (3 * inter + 6 * mc.hidden_size) * elem
        logits = sc.max_num_seqs * mc.vocab_size * 4 * 4
        return sc.max_num_batched_tokens * per_token + logits + (512 << 20)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def capture_cuda_graphs(self) -> float:
        sc = self.config.scheduler
        return self.runner.capture_cuda_graphs(sc.max_num_seqs, sc.max_model_len)

    def add_lora(self, adapter) -> None:
        """Read a checked adapter (``engine.step.LoRAAdapter``) into host memory now (a step would
        otherwise read it when first needed)."""
        self.runner.lora.add(adapter)

    def remove_lora(self, lora_int_id: int) -> None:
        self.runner.lora.remove(lora_int_id)

    def launch(self, scheduler_output):
        """Queue a step without waiting for it (single-stage worker); returns a ``PendingOutput``."""
        return self.runner.launch(scheduler_output)

    @torch.inference_mode()
    def execute_stage(self, scheduler_output):
        """This worker's share of a step in a TP x PP replica.

        A later stage first receives (hidden, residual) from the same TP rank
        of the previous stage (its shape follows from the step's token count,
        so no handshake); a non-last stage sends its result on and returns
        None. On the last stage only TP rank 0 returns the ``ModelRunnerOutput``
        (the other ranks' would be empty anyway).
        """
        from fleetlm.parallel.pipeline import recv_from_prev_stage, send_to_next_stage

        ctx, runner, out = self.ctx, self.runner, scheduler_output
        hidden = residual = None
        if not ctx.is_first_stage and not out.is_empty:
            hidden, residual = recv_from_prev_stage(
                ctx, out.num_batched_tokens, self.config.model.hidden_size, runner.dtype, self.device
            )
        result = runner.execute(out, hidden, residual)
        if not ctx.is_last_stage:
            if not out.is_empty:
                send_to_next_stage(ctx, *result)
            return None
        return result if ctx.tp_rank == 0 else None
