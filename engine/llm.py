"""``LLM``: the offline API, with vLLM's names so users can switch."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from fleetlm.engine.args import DEFAULT_MODEL, EngineArgs
from fleetlm.engine.llm_engine import LLMEngine
from fleetlm.engine.lora import LoRARequest
from fleetlm.engine.outputs import RequestOutput
from fleetlm.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate from a batch of prompts with continuous batching.

    ``LLM(model="smollm2-135m-instruct")`` runs the embedded default model; a
    local HF directory, a ``.gguf`` file or (with ``load_format="dummy"``) a
    config from ``configs/models`` also work. Unknown keyword arguments are an
    error, not silently ignored.
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs) -> None:
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.engine = LLMEngine(args.create_engine_config())
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``; ``lora_request``: one adapter for every
        prompt, or one (or None, the base model) per prompt (needs ``enable_lora=True``)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} lora_requests for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p, lora_request=lora)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        tools: list[dict] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, tools) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        return apply_chat_template(self.engine.tokenizer, messages, add_generation_prompt, tools)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.engine.step(emit_unfinished=False):
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
            if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                raise RuntimeError("engine went idle with unfinished requests")
        if bar:
            bar.close()
        return [done[i] for i in ids]


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation under the model's chat template; ``tools`` (OpenAI's
    function tools) go to the template, which renders them if it knows how (vLLM's behaviour)."""
    if not messages:
        raise ValueError("messages must not be empty")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"each message needs a role of system, user, assistant or tool, got {m!r:.80}")
        # An assistant message that only calls tools has no text.
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ValueError("each message's content must be a string")
    kw = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kw)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
