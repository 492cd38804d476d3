"""From sampled tokens to ``RequestOutput``: children of ``n``, stop strings, logprobs, text.

A user request is a :class:`RequestGroup` of ``n`` :class:`Sequence` children,
each a scheduler ``Request`` with its own detokenizer. The engine hands every
step's new tokens here (``process``); this module decides the text (stop
strings are matched as text arrives and end the sequence), assembles
logprob dicts, and builds the cumulative outputs users see. It never touches
the scheduler except to end a sequence on a stop string (``finish``).
"""

from __future__ import annotations

from collections.abc import Callable

from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fleetlm.engine.request import Request, RequestStatus
from fleetlm.engine.step import LogprobEntry


class Sequence:
    """Output-side state of one of the n sequences of a request."""

    def __init__(self, index: int, req: Request, detok: IncrementalDetokenizer) -> None:
        self.index, self.req, self.detok = index, req, detok
        self.logprobs: list[dict[int, Logprob]] | None = [] if req.params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if req.params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Without stop strings nothing depends on the text until someone reads
        # it, so tokens wait here and are detokenized in one call per output.
        self.undecoded: list[int] = []
        self.text_done = False

    def text(self) -> str:
        if self.undecoded:
            self.detok.update(self.undecoded)
            self.undecoded = []
        if self.finish_reason is not None and not self.text_done:
            self.detok.flush()
            self.text_done = True
        return self.detok.output_text


class RequestGroup:
    """One user request: its prompt and its n sequences."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.children: list[Sequence] = []
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # when asked: filled by position
        self.grammar = None  # guided requests: the Future of their compiled grammar (engine/structured_output.py)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    def abort(self) -> None:
        for c in self.children:
            if c.finish_reason is None:
                c.finish_reason = "abort"

    def output(self) -> RequestOutput:
        first = self.children[0].req
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=c.index,
                    text=c.text(),
                    token_ids=c.req.output_token_ids[c.req.num_prior_output_tokens :],
                    cumulative_logprob=c.cumulative_logprob,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in self.children
            ],
            finished=self.finished,
            num_cached_tokens=max(0, first.num_cached_tokens),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            metrics=RequestMetrics(
                arrival_time=first.times.arrival,
                first_scheduled_time=first.times.first_scheduled,
                first_token_time=min((c.req.times.first_token for c in self.children if c.req.times.first_token), default=None),
                finished_time=max((c.req.times.finished or 0 for c in self.children), default=None) if self.finished else None,
            ),
        )


class OutputProcessor:
    """The open request groups and what each step's tokens do to them."""

    def __init__(self, finish: Callable[[str, RequestStatus], object]) -> None:
        self._finish = finish  # ends a scheduler request (a stop string matched)
        self.groups: dict[str, RequestGroup] = {}
        self._sequence: dict[str, tuple[RequestGroup, Sequence]] = {}

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group
        for child in group.children:
            self._sequence[child.req.request_id] = (group, child)

    def pop(self, request_id: str) -> RequestGroup | None:
        group = self.groups.pop(request_id, None)
        if group is not None:
            for c in group.children:
                self._sequence.pop(c.req.request_id, None)
        return group

    def process(self, results: list[tuple[Request, list[int]]], logprobs: dict[str, list[LogprobEntry] | None],
                emit_unfinished: bool,
                prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] | None = None) -> list[RequestOutput]:
        """Apply one step's (request, new tokens); outputs of the groups it advanced."""
        for rid, (first, entries) in (prompt_logprobs or {}).items():
            self._prompt_entries(rid, first, entries)
        touched: dict[str, RequestGroup] = {}
        for req, tokens in results:
            if not tokens:
                continue
            group, child = self._sequence[req.request_id]
            entries = logprobs.get(req.request_id)
            for j, token in enumerate(tokens):
                last = j == len(tokens) - 1
                self._token(child, req, token, entries[j] if entries is not None else None, last)
                if child.finish_reason is not None:
                    if not last:  # a stop string before the step's last token: the rest never happened
                        req.drop_last_tokens(len(tokens) - 1 - j)
                    break
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            if emit_unfinished or group.finished:
                outputs.append(group.output())
            if group.finished:
                self.pop(group.request_id)
        return outputs

    def _prompt_entries(self, request_id: str, first: int, entries: list[LogprobEntry]) -> None:
        """Prompt logprobs of positions first, first + 1, ... (a recomputation after preemption overwrites)."""
        found = self._sequence.get(request_id)
        if found is None:  # ended meanwhile
            return
        group, child = found
        if group.prompt_logprobs is None:
            group.prompt_logprobs = [None] * len(group.prompt_token_ids)
        decode = child.detok.decode_token
        for p, entry in enumerate(entries, start=first):
            scored: dict[int, Logprob] = {}
            for tid, lp, rank in entry:  # the prompt's own token first, with its true rank
                if tid not in scored:
                    scored[tid] = Logprob(lp, rank, decode(tid))
            group.prompt_logprobs[p] = scored

    def _token(self, child: Sequence, req: Request, token: int, lps: LogprobEntry | None, last: bool) -> None:
        if lps is not None and child.logprobs is not None:
            entry = {}
            for tid, lp, rank in lps:
                if tid not in entry:
                    entry[tid] = Logprob(lp, rank, child.detok.decode_token(tid))
            child.logprobs.append(entry)
            child.cumulative_logprob += lps[0][1]
        # The scheduler stops a request on the token that ends it (EOS, a stop
        # token id, length), which is then the last of the step's tokens.
        ended_here = last and req.is_finished
        stopped_on_token = ended_here and req.status == RequestStatus.FINISHED_STOPPED
        if not (stopped_on_token and not req.params.include_stop_str_in_output):
            child.undecoded.append(token)
        if req.params.stop and not ended_here:
            # Stop strings are matched as text arrives, so decode now.
            stop_str = child.detok.update(child.undecoded)
            child.undecoded = []
            if stop_str is not None:
                self._finish(req.request_id, RequestStatus.FINISHED_STOPPED)
                req.stop_reason = stop_str
                child.text_done = True  # the detokenizer already cut the text at the stop string
                child.finish_reason, child.stop_reason = "stop", stop_str
                return
        if ended_here:
            child.finish_reason = req.status.finish_reason
            child.stop_reason = req.stop_reason
