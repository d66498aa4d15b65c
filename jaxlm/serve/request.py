"""What a client asks for (:class:`Request`) and what it gets back (:class:`Output`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence


class RequestError(ValueError):
    """A request that cannot be served, described in one line a client can act on."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion request. ``prompt`` is text (needs the engine's tokenizer) or token ids.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Generation stops after
    ``max_tokens`` new tokens, at any id of the engine's EOS set (unless ``ignore_eos``) or of
    ``stop_token_ids`` (kept in ``token_ids``, left out of the text), or once the text contains one
    of ``stop`` (the text is cut before it). ``seed`` fixes the sampling: the
    same request with the same seed gives the same tokens whatever else the engine is running.
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

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
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
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise RequestError("prompt must not be empty")
        elif not self.prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.prompt):
            raise RequestError("prompt must be a non-empty string or a non-empty list of token ids")


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
