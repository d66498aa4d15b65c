"""From a validated OpenAI request body to engine requests, and from engine events to OpenAI's
response objects (``text_completion``, ``chat.completion``, their stream chunks, ``usage``).

Choice ``i * n + j`` is choice ``j`` of prompt ``i`` (vLLM's order). ``usage`` counts each prompt
once and every choice's tokens. Log-probabilities take OpenAI's shapes: completions
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, chat ``{"content": [{"token",
"logprob", "bytes", "top_logprobs"}]}``; a token's string is its own decoding (special tokens kept),
or ``token_id:{id}`` with vLLM's ``return_tokens_as_token_ids``. A completion with ``echo`` and
``logprobs`` lists the prompt's tokens first, the first of them with ``null`` log-probabilities
(OpenAI's legacy layout; the stream sends them with the echoed prompt), ``text_offset`` counting
characters from the start of the echoed prompt.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from jaxlm.serve.engine import Engine, Event
from jaxlm.serve.protocol import MAX_CHOICES, BadRequest, ChatCompletionRequest, CompletionRequest
from jaxlm.serve.request import Output, Request, TokenLogprobs

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def build_requests(engine: Engine, body: CompletionRequest | ChatCompletionRequest, prompts: list,
                   chat: bool, request_id: str) -> list[Request]:
    """``n`` engine requests per prompt (text or ids), ids ``{request_id}-{k}``; choice ``j`` of a
    seeded body uses ``seed + j``. A chat body without a length limit gets the rest of the context."""
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise BadRequest(f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices; at most {MAX_CHOICES} "
                         "per request", "n")
    if chat:
        limit = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        limit = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        logprobs = body.logprobs
    prompt_logprobs = logprobs if not chat and body.echo else None
    stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    out = []
    for i, prompt in enumerate(prompts):
        max_tokens = limit
        if max_tokens is None:  # chat: until EOS or the context ends
            size = len(prompt) if not isinstance(prompt, str) else len(engine.tokenizer.encode(prompt).ids)
            max_tokens = engine.max_context - size
            if max_tokens < 1:
                raise BadRequest(f"the prompt ({size} tokens) fills the context of {engine.max_context} tokens; "
                                 "shorten the messages", "messages")
        for j in range(n):
            out.append(Request(
                prompt, max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p, stop=stop,
                seed=None if body.seed is None else body.seed + j, request_id=f"{request_id}-{i * n + j}",
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos),
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                min_tokens=body.min_tokens or 0, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            ))
    return out


class Choices:
    """The choices of one HTTP request as their engine events arrive, rendered in OpenAI's shapes."""

    def __init__(self, engine: Engine, body, requests: Sequence[Request], prompts: list, chat: bool,
                 model_name: str, request_id: str):
        self.engine, self.body, self.requests, self.chat = engine, body, requests, chat
        self.n = body.n or 1
        self.outputs: list[Output | None] = [None] * len(requests)
        self.started = [False] * len(requests)
        self.head = {"id": request_id, "created": int(time.time()), "model": model_name}
        self.echo = [self._text_of(p) for p in prompts] if not chat and body.echo else None
        self.prompts = prompts
        self.text_offsets = [0] * len(requests)  # characters of each choice's logprobs tokens streamed so far
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def _text_of(self, prompt) -> str:
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(list(prompt)) if self.engine.tokenizer else ""

    def unfinished(self) -> list[int]:
        return [i for i, o in enumerate(self.outputs) if o is None]

    def add(self, i: int, event: Event) -> None:
        if event.output is not None:
            self.outputs[i] = event.output

    # ---------------------------------------------------------------- log-probabilities
    def _token(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)

    def _prompt_ids(self, i: int) -> list[int]:
        prompt = self.prompts[i // self.n]
        return list(prompt) if not isinstance(prompt, str) else self.engine.tokenizer.encode(prompt).ids

    def _with_prompt(self, i: int, token_ids: list[int], logprobs, prompt_logprobs):
        """(ids, log-probabilities) with the echoed prompt's in front when the request scored it."""
        if self.echo is None or prompt_logprobs is None or logprobs is None:
            return token_ids, logprobs
        return self._prompt_ids(i) + list(token_ids), list(prompt_logprobs) + list(logprobs)

    def _logprobs(self, token_ids: list[int], logprobs: list[TokenLogprobs | None] | None, offset: int = 0) -> dict | None:
        if logprobs is None:
            return None
        tokens = [self._token(t) for t in token_ids]
        if self.chat:
            def entry(t: int, lp: float) -> dict:
                s = self._token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, b) for a, b in lp.top]}
                                for t, lp in zip(token_ids, logprobs)], "refusal": None}
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
                "top_logprobs": [None if lp is None else {self._token(a): b for a, b in lp.top} for lp in logprobs],
                "text_offset": offsets}

    # ---------------------------------------------------------------- whole responses
    def usage(self) -> dict[str, Any]:
        """OpenAI's ``usage``; ``prompt_tokens_details.cached_tokens`` counts the prompt tokens the prefix
        cache held (each prompt once, as ``prompt_tokens``: the first of its ``n`` choices)."""
        firsts = [o for k, o in enumerate(self.outputs) if o is not None and k % self.n == 0]
        prompt = sum(len(o.prompt_ids) for o in firsts)
        completion = sum(len(o.token_ids) for o in self.outputs if o is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in firsts)}}

    def response(self) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(self.outputs):
            text = out.text or ""
            logprobs = self._logprobs(*self._with_prompt(i, out.token_ids, out.logprobs, out.prompt_logprobs))
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                                "finish_reason": out.finish_reason})
            else:
                echo = self.echo[i // self.n] if self.echo is not None else ""
                choices.append({"index": i, "text": echo + text, "logprobs": logprobs, "finish_reason": out.finish_reason})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}

    # ---------------------------------------------------------------- streams
    @staticmethod
    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def chunk(self, i: int, event: Event) -> str | None:
        """The server-sent event for one engine event of choice ``i`` (None when it carries nothing)."""
        self.add(i, event)
        reason = event.output.finish_reason if event.output is not None else None
        text = event.text
        if not self.started[i] and self.echo is not None:
            text = self.echo[i // self.n] + text
        prompt_logprobs = event.prompt_logprobs if not self.started[i] else None
        logprobs = self._logprobs(*self._with_prompt(i, event.new_token_ids, event.logprobs, prompt_logprobs),
                                  offset=self.text_offsets[i])
        if logprobs is not None and not self.chat and logprobs["tokens"]:
            self.text_offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        if not (text or reason or logprobs):
            return None
        if self.chat:
            delta = {"content": text} if self.started[i] else {"role": "assistant", "content": text}
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
        self.started[i] = True
        obj = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion", "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return self.sse(obj)

    def usage_chunk(self) -> str | None:
        """The last chunk, ``choices: []`` and the usage, when ``stream_options.include_usage`` asked for it."""
        if not self.include_usage:
            return None
        return self.sse({**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                         "choices": [], "usage": self.usage()})
