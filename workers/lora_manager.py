"""A worker's LoRA adapters: host copies (LRU), the device slots, and each step's tile table.

The scheduler decides which adapter sits in which device slot
(``engine/lora_slots.py``) and sends the changes with the step that first
needs them (``SchedulerOutput.lora_loads``); this worker makes them so
before the step's forward, in stream order (a slot's old adapter may still
be read by the step before; the copy runs after it). An adapter comes from
the host cache, an LRU of ``max_cpu_loras`` adapters already cut to this
rank's shares and laid out as slots (``parallel/lora.py``; pinned on CUDA,
so a load is an asynchronous copy of ~84 MB for rank 16 on all projections
of an 8B model), or else from its PEFT directory.

Each step, the tokens' slots (from their requests' adapters) become the tile
table the LoRA kernels read (``kernels/lora.py``), uploaded in one copy into
fixed buffers, so CUDA graphs replay with any mix of adapters.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fleetlm.engine.config import LoRAConfig
from fleetlm.engine.step import LoRAAdapter, SchedulerOutput
from fleetlm.kernels.lora import LoRABatch, build_tile_table, table_runs, tile_capacity
from fleetlm.parallel.lora import LoRAState, attach_lora, pack_adapter

_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class HostAdapter:
    adapter: LoRAAdapter
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per LoRA layer: (A, B) in slot layout


class LoRAManager:
    def __init__(self, model, ops, config: LoRAConfig, dtype: torch.dtype, device: torch.device,
                 max_rows: int) -> None:
        self.config, self.dtype, self.device, self.ops = config, dtype, device, ops
        self.max_rows = max_rows
        self.num_tile_cap = tile_capacity(max_rows, config.max_loras)
        # One int32 buffer holds the whole tile table: one host->device copy per step.
        self._table = torch.full((3 * self.num_tile_cap + max_rows,), -1, dtype=torch.int32, device=device)
        t = self.num_tile_cap
        batch = LoRABatch(token_idx=self._table[3 * t:], tile_slot=self._table[:t], tile_start=self._table[t:2 * t],
                          tile_end=self._table[2 * t:3 * t],
                          scale=torch.zeros(config.max_loras, dtype=torch.float32, device=device))
        self.state = LoRAState(batch, torch.cuda.Stream(device) if device.type == "cuda" else None)
        self.layers = attach_lora(model, ops, config.max_loras, config.max_lora_rank, self.state, dtype, device)
        self.host: OrderedDict[int, HostAdapter] = OrderedDict()
        self._lock = threading.Lock()  # add/remove may come from another thread than the steps
        self.slot_adapter: list[int | None] = [None] * config.max_loras
        self.adapter_of: dict[str, int | None] = {}  # request id -> lora_int_id (None: base)
        self.num_disk_loads = 0
        self.num_slot_loads = 0

    # -- adapters in host memory ----------------------------------------------------
    def add(self, lora: LoRAAdapter) -> None:
        """Have ``lora`` in host memory (read from its directory unless already there)."""
        self._host(lora)

    def remove(self, lora_int_id: int) -> None:
        with self._lock:
            self.host.pop(lora_int_id, None)

    def _host(self, lora: LoRAAdapter) -> HostAdapter:
        with self._lock:
            entry = self.host.get(lora.lora_int_id)
            if entry is not None and entry.adapter == lora:
                self.host.move_to_end(lora.lora_int_id)
                return entry
        entry = self._read(lora)
        with self._lock:
            self.host[lora.lora_int_id] = entry
            self.host.move_to_end(lora.lora_int_id)
            while len(self.host) > self.config.max_cpu_loras:
                self.host.popitem(last=False)
        return entry

    def _read(self, lora: LoRAAdapter) -> HostAdapter:
        """Read a PEFT adapter's tensors (the engine checked its files) and cut them into this rank's slot layout."""
        from safetensors.torch import load_file

        raw = load_file(str(Path(lora.path) / "adapter_model.safetensors"), device="cpu")
        pairs: dict[tuple[int, str], list] = {}
        for key, tensor in raw.items():
            m = _TENSOR.match(key)
            if m is None:
                raise ValueError(f"adapter {lora.lora_name!r}: unexpected tensor {key}")
            pair = pairs.setdefault((int(m.group(1)), m.group(2)), [None, None])
            pair[m.group(3) == "B"] = tensor.to(self.dtype)
        tensors = {k: (a, b) for k, (a, b) in pairs.items()}
        layers = pack_adapter(self.layers, tensors, self.config.max_lora_rank, pin=self.device.type == "cuda")
        self.num_disk_loads += 1
        return HostAdapter(lora, layers)

    # -- each step ------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, rows: int) -> None:
        """Load the step's new slots and build its tile table for a forward of ``rows`` rows."""
        for rid in out.finished_request_ids:
            self.adapter_of.pop(rid, None)
        for new in out.new_requests:
            self.adapter_of[new.request_id] = new.lora_int_id
        for slot, lora in out.lora_loads.items():
            self._load_slot(slot, lora)
        slot_of = {a: s for s, a in enumerate(self.slot_adapter) if a is not None}
        per_req = []
        for s in out.scheduled:
            adapter = self.adapter_of.get(s.request_id)
            if adapter is not None and adapter not in slot_of:
                raise RuntimeError(f"{s.request_id}: its adapter {adapter} is in no device slot")
            per_req.append(-1 if adapter is None else slot_of[adapter])
        q_lens = [len(s.token_ids) for s in out.scheduled]
        token_slot = np.repeat(np.asarray(per_req, dtype=np.int32), q_lens)
        token_slot = np.concatenate([token_slot, np.full(rows - token_slot.size, -1, dtype=np.int32)])
        self.state.active = bool((token_slot >= 0).any())
        self._upload(token_slot, rows)

    def _upload(self, token_slot: np.ndarray, rows: int) -> None:
        if rows > self.max_rows:
            raise RuntimeError(f"a step of {rows} rows exceeds the LoRA tile table's {self.max_rows}")
        order, tile_slot, tile_start, tile_end = build_tile_table(token_slot, rows, self.config.max_loras)
        t = self.num_tile_cap
        host = np.full(self._table.numel(), -1, dtype=np.int32)
        host[:tile_slot.size] = tile_slot
        host[t:t + tile_start.size] = tile_start
        host[2 * t:2 * t + tile_end.size] = tile_end
        host[3 * t:3 * t + order.size] = order
        src = torch.from_numpy(host)
        if self.device.type == "cuda":
            src = src.pin_memory()
        else:  # the torch references run here: hand them the runs the host already has
            self.state.batch.host_runs = table_runs(order, tile_slot, tile_start, tile_end)
        self._table.copy_(src, non_blocking=True)

    @torch.inference_mode()
    def warm_up(self, rows: tuple[int, ...] = (1, 256, 257, 2048, 1 << 30)) -> None:
        """Run every layer shape's kernels at the tile sizes and split classes serving takes, so
        Triton compiles them now, not in a request's prefill (decode sizes compile at graph capture)."""
        shapes = {}
        for lay in self.layers:
            m = lay.module
            shapes.setdefault((tuple(m.lora_a.shape), tuple(m.lora_b.shape), m.lora_slices), m)
        batch = self.state.batch
        for n in sorted({min(r, self.max_rows) for r in rows}):
            self._upload(np.zeros(n, dtype=np.int32), n)  # every row in slot 0
            for m in shapes.values():
                x = torch.zeros(n, m.in_per_rank, dtype=self.dtype, device=self.device)
                y = torch.zeros(n, m.out_per_rank, dtype=self.dtype, device=self.device)
                self.ops.lora_expand(y, self.ops.lora_shrink(x, m.lora_a, batch), m.lora_b, batch, m.lora_slices)
        self._upload(np.full(1, -1, dtype=np.int32), 1)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the KV cache is sized from free memory next: give the scratch back

    def _load_slot(self, slot: int, lora: LoRAAdapter) -> None:
        entry = self._host(lora)
        for lay, (a, b) in zip(self.layers, entry.layers):
            lay.module.lora_a[slot].copy_(a, non_blocking=True)
            lay.module.lora_b[slot].copy_(b, non_blocking=True)
        self.state.batch.scale[slot] = lora.scaling
        self.slot_adapter[slot] = lora.lora_int_id
        self.num_slot_loads += 1

