"""What a client asks for (:class:`Request`) and what it gets back (:class:`Output`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


MAX_LOGPROBS = 20  # top alternatives a request may ask for per token
MAX_STOP_TOKEN_IDS = 64  # stop_token_ids of one request


class RequestError(ValueError):
    """A request that cannot be served, described in one line a client can act on."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion request. ``prompt`` is text (needs the engine's tokenizer) or token ids.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Generation stops after
    ``max_tokens`` new tokens (0: the prompt is read, and scored with ``prompt_logprobs``, and the
    request finishes with no new token and finish reason ``"length"``), at any id of the engine's EOS set (unless ``ignore_eos``) or of
    ``stop_token_ids`` (kept in ``token_ids``, left out of the text), or once the text contains one
    of ``stop`` (the text is cut before it); not before ``min_tokens`` new tokens (the stop ids are
    masked out until then, as vLLM's ``min_tokens``). ``seed`` fixes the sampling: the
    same request with the same seed gives the same tokens whatever else the engine is running.

    ``presence_penalty`` and ``frequency_penalty`` (each in [-2, 2]) lower the logit of token ``j``
    by ``c[j] * frequency_penalty + (c[j] > 0) * presence_penalty``, ``c[j]`` being how often ``j``
    was generated so far (OpenAI's formula: platform.openai.com/docs/advanced-usage, "Frequency and
    presence penalties"), before temperature. ``logprobs`` (None or 0..20) asks for each new token's
    log-probability and that many top alternatives, of the distribution the token was drawn from
    (see :class:`TokenLogprobs`). ``prompt_logprobs`` (None or 0..20, vLLM's name) asks the same for
    every prompt token after the first, under the model's own distribution (log-softmax of its
    logits: no penalty, temperature or filter); such a request reuses cached pages only as far as
    it has scored its prompt (it must compute the logits of every prompt position).
    """

    prompt: str | Sequence[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    request_id: str | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise RequestError(f"max_tokens must be an integer >= 0 (0: only score the prompt), got {self.max_tokens!r}")
        if not 0 <= self.temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop must be a tuple of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise RequestError("stop_token_ids must be a list of token ids (integers)")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise RequestError("prompt must not be empty")
        elif not self.prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.prompt):
            raise RequestError("prompt must be a non-empty string or a non-empty list of token ids")


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the ``top`` most likely ids with theirs (best first).

    The distribution is the one the token was sampled from ("processed" in vLLM's terms,
    ``--logprobs-mode processed_logprobs``): the model's logits after the penalties, divided by the
    temperature (1 for greedy requests), with the tokens top-k/top-p removed at -inf, then
    log-softmax. JSON has no -inf: a removed token's log-probability is reported as -9999.0.
    """

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass
class Output:
    """A finished request: the new token ids (and text, when the engine has a tokenizer)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (an EOS or stop token, or a stop string) | "length" (max_tokens)
    preemptions: int = 0
    time_to_first_token_s: float = 0.0
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, when the request asked
    cached_tokens: int = 0  # prompt tokens read from the prefix cache when it was first scheduled (not prefilled)
    # one per prompt token when the request asked (``prompt_logprobs``): None for the first, which
    # nothing predicts, then each token's log-probability given the ones before it (vLLM's layout)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
