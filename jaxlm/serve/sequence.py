"""One request as the engine runs it: its tokens, cache pages and text, and the rules that end it.

:class:`RequestState` is what :class:`jaxlm.serve.engine.Engine` keeps per request between steps;
:meth:`RequestState.accept` takes each new token and says whether the request is finished
(``"stop"``: an id of its stop set, or one of its stop strings once ``min_tokens`` are out;
``"length"``: ``max_tokens``) and which text became final. :class:`Event` is what a step hands out.
"""

from __future__ import annotations

import dataclasses

from jaxlm.detokenize import IncrementalDetokenizer
from jaxlm.serve.request import Output, Request, TokenLogprobs


@dataclasses.dataclass
class Event:
    """What one step produced for one request: its new tokens, the text that became final with
    them (empty without a tokenizer; all deltas of a request concatenate to its output's text),
    and its output once finished."""

    request_id: str
    new_token_ids: list[int]
    output: Output | None = None
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None  # for new_token_ids, when the request asked
    error: str | None = None
    # with the first token of a request that asked for them (Output.prompt_logprobs' layout)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # the request failed (it holds no pages any more); output stays None


@dataclasses.dataclass(eq=False)
class RequestState:
    request: Request
    request_id: str
    prompt_ids: list[int]
    tokens: list[int]  # prompt + generated
    seed: int
    arrival: float
    stop_ids: frozenset[int]  # ids that end it: the engine's EOS set (unless ignore_eos) + stop_token_ids
    detok: IncrementalDetokenizer | None  # its text, decoded against the prompt
    knobs: tuple  # sampling knobs in the step's dtypes (jaxlm.serve.sampling.knobs)
    sent: int = 0  # characters of the text already handed out in events
    num_cached: int = 0  # tokens whose keys/values are in the cache
    prompt_cached: int | None = None  # prompt tokens the prefix cache held at its first admission
    pages: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full pages, as far as computed
    lost: int = 0  # tokens it had cached when last preempted
    admitted: int = -1  # admission order: higher is more recent
    slot: int = -1  # row in the decode batch; -1 while waiting
    preemptions: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # of prompt tokens 1, 2, ... as far as scored
    text_end: int = 0  # characters of the text that are its output, once finished

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    @property
    def remaining(self) -> int:  # tokens still to feed; 1 means decoding
        return len(self.tokens) - self.num_cached

    @property
    def scoring(self) -> bool:
        """Whether prompt tokens are still to be scored (the request asked for ``prompt_logprobs``)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    def scored_prompt(self) -> list[TokenLogprobs | None] | None:
        """The prompt log-probabilities as handed out (None first: nothing predicts the first token)."""
        return None if self.prompt_logprobs is None else [None, *self.prompt_logprobs]

    def score(self, start: int, logprob_T, top_ids_TxK, top_lp_TxK) -> None:
        """Keep the prompt log-probabilities of one call that fed tokens from ``start`` (its row's
        ``[T]`` log-probabilities of the next token and ``[T, K]`` top alternatives); position ``t``
        predicts token ``start + t + 1``, and only the next unscored tokens of the prompt are kept."""
        k = self.request.prompt_logprobs
        for t in range(len(logprob_T)):
            if start + t + 1 != len(self.prompt_logprobs) + 1 or start + t + 1 >= len(self.prompt_ids):
                continue
            self.prompt_logprobs.append(TokenLogprobs(float(logprob_T[t]), tuple(zip(
                top_ids_TxK[t][:k].tolist(), top_lp_TxK[t][:k].tolist()))))

    def accept(self, token: int, logprob: TokenLogprobs | None) -> tuple[str | None, str]:
        """Append a sampled token: ``(finish reason or None, the text that became final with it)``.

        A stop id ends the request and stays out of the text; a stop string ends it with the text cut
        before it (only in text not yet handed out, and not before ``min_tokens``). While it runs, an
        incomplete UTF-8 character and what may begin a stop string are held back.
        """
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        self.tokens.append(token)
        reason, end = None, None
        if token in self.stop_ids:
            reason = "stop"
        elif self.detok is not None:
            self.detok.push([token])
        text = self.detok.text if self.detok is not None else ""
        stops = self.request.stop
        if reason is None and stops and len(self.generated) >= self.request.min_tokens:
            hits = [i for i in (text.find(s, self.sent) for s in stops) if i >= 0]
            if hits:
                reason, end = "stop", min(hits)
        if reason is None and len(self.generated) >= self.request.max_tokens:
            reason = "length"
        if reason is None:
            end = self.detok.stable if self.detok is not None else 0
            end -= max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        end = len(text) if end is None else end
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        self.text_end = end
        return reason, delta

    def output(self, reason: str) -> Output:
        """The finished request's :class:`~jaxlm.serve.request.Output`."""
        text = self.detok.text[: self.text_end] if self.detok is not None else None
        return Output(self.request_id, self.prompt_ids, self.generated, text, reason, self.preemptions,
                      self.first_token_s, self.logprobs, self.prompt_cached or 0, self.scored_prompt())
