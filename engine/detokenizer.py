"""Incremental detokenization of one output sequence, with stop strings.

Decoding token by token is not ``decode(ids)`` piece by piece: a character may
be split across tokens (byte-level BPE emits UTF-8 bytes), some decoders treat
a window's first token specially (SentencePiece's leading space), and special
tokens may be skipped. So, like vLLM, we decode a short sliding window of
token ids and take the text it adds beyond its prefix:

- the window holds ``prefix`` tokens (already turned into text; context only)
  followed by the tokens not yet fully released;
- ``decode(window)[len(decode(prefix)):]`` is the new text; a trailing run of
  U+FFFD means an incomplete character, which is held (together with its
  tokens) until later tokens complete it; text before that run is final;
- once the window's text ends on a complete character the window slides: its
  unreleased tokens become the next prefix.

Each update decodes O(window) tokens, not the whole output. The window starts
with the last few prompt tokens as context, so the first output token decodes
as a continuation (as in vLLM).

Stop strings: a match must end inside the newly decoded text (so each match is
found once), and matching starts once more than ``min_tokens`` tokens were
produced (vLLM's rule). The *released* text (``output_text``) holds back any
tail that could still grow into a stop string, so a stop string never reaches
the client, nor half of one in one streamed delta; ``flush()`` releases that
tail (and any incomplete character) when the request ends for another reason.
"""

from __future__ import annotations

from fleetlm.engine.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, as context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, step by step.

    Protocol for the engine: call ``update(new_ids)`` with each step's new
    tokens; a non-None result is the stop string that ended the request (the
    text is already truncated and fully released). When the request ends for
    another reason (EOS, stop token id, length, abort) call ``flush()`` so that
    ``output_text`` holds everything.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        # Honoured by slow tokenizers; fast ones join special tokens without spaces either way.
        self._spaces_between_special = params.spaces_between_special_tokens
        self._detokenize = params.detokenize
        self._stop: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self.output_token_ids: list[int] = []
        self.finished = False
        self._token_text: dict[int, str] = {}

        self._text = ""  # decoded so far (stop-truncated); released prefix + held tail
        self._released = 0  # len of the released prefix of _text
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if self._detokenize else []
        prefix_text = self._decode(context) if context else ""
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: the output completes it. Decode
            # the output on its own so its text is what decode(output) gives.
            context, prefix_text = [], ""
        self._window = context  # token ids: prefix, then unreleased tokens
        self._read = len(context)  # window[:_read] is the prefix
        self._prefix_len = len(prefix_text)  # len(decode(window[:_read]))
        self._emitted = 0  # chars of decode(window) past the prefix already in _text

    # -- public ----------------------------------------------------------------
    @property
    def output_text(self) -> str:
        """The released text: final, never retracted, never part of a stop string."""
        return self._text[: self._released]

    def update(self, new_token_ids: list[int]) -> str | None:
        """Add a step's tokens; return the stop string they completed, if any."""
        if self.finished:
            raise RuntimeError("update() after the sequence finished")
        self.output_token_ids.extend(new_token_ids)
        if not new_token_ids or not self._detokenize:
            return None
        old_len = len(self._text)
        self._text += self._decode_new(new_token_ids)

        if self._stop and len(self.output_token_ids) > self._min_tokens:
            stop = self._find_stop(old_len)
            if stop is not None:
                self.finished = True
                self._released = len(self._text)
                return stop
        self._released = max(self._released, len(self._text) - self._stop_prefix_len())
        return None

    def flush(self) -> None:
        """Release everything held: a possible stop-string prefix and an
        incomplete trailing character. Idempotent; ends the sequence."""
        if self.finished:
            return
        self.finished = True
        if self._detokenize and len(self._window) > self._read:
            self._text += self._decode(self._window)[self._prefix_len + self._emitted :]
        self._released = len(self._text)

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own (for ``Logprob.decoded_token``)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # -- internals -------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self._spaces_between_special,
        )

    def _decode_new(self, new_token_ids: list[int]) -> str:
        self._window.extend(new_token_ids)
        full = self._decode(self._window)
        start = self._prefix_len + self._emitted
        end = len(full)
        while end > start and full[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        new_text = full[start:end]
        if end == len(full):
            # Complete characters up to the end: slide the window so the
            # tokens just turned into text become the next prefix.
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._prefix_len = len(self._decode(self._window))
            self._emitted = 0
        else:
            self._emitted = end - self._prefix_len
        return new_text

    def _find_stop(self, old_len: int) -> str | None:
        """Earliest stop string ending past ``old_len``; truncates ``_text`` at it."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self._text.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self._text = self._text[: i + len(s)] if self._include_stop else self._text[:i]
        return s

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of ``_text`` that is a proper prefix of a stop string."""
        held = 0
        text = self._text
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held
