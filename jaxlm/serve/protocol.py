"""The OpenAI API's request bodies as pydantic models, every field bounded, and its error shape.

Field names, types and ranges follow OpenAI's API reference (``/v1/completions``,
``/v1/chat/completions``) plus the extensions vLLM's OpenAI-compatible server accepts
(``top_k``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``/tokenize``, ``/detokenize``).
A body is checked in two steps before anything reaches the engine: :func:`parse_body` (JSON,
size, nesting depth, valid Unicode, finite numbers) and ``Model.model_validate(data, strict=True)``
(types, ranges, unknown fields). :func:`validation_message` turns pydantic's error into one line
and the offending field (``param``); :func:`error_body` is OpenAI's error object.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this is answered 413
MAX_DEPTH = 16  # nesting of JSON objects and arrays (a chat body needs 5)
MAX_STRING_CHARS = 2**20
MAX_PROMPTS = 64  # prompts of one batched completion request
MAX_N = 16  # choices per prompt
MAX_CHOICES = 256  # choices of one request: prompts x n
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat's top_logprobs; completions' logprobs uses it too
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 4096
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class BadRequest(ValueError):
    """A request the server answers with a 4xx: one line, the field at fault, OpenAI's ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _reject_constant(name: str) -> None:
    raise BadRequest(f"the body is not valid JSON: {name} is not a number JSON allows")


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``, or :class:`BadRequest` (size, syntax, depth, Unicode, NaN/Infinity)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    except BadRequest:  # NaN/Infinity (_reject_constant): a ValueError too, with its own message
        raise
    except ValueError:  # Python's int() limit (sys.get_int_max_str_digits, 4300 digits by default)
        raise BadRequest(f"the body holds a number with more than {sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    """Depth, string length and valid Unicode of every value (iterative: no recursion on hostile input)."""
    stack = [(data, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise BadRequest(f"a string is {len(value)} characters; the limit is {MAX_STRING_CHARS}", where or None)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("a string holds an unpaired UTF-16 surrogate (not valid Unicode)", where or None) from None
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels", where or None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str):
                    stack.append((k, depth, where))
                stack.append((v, depth + 1, f"{where}.{k}" if where else str(k)))


_SHAPES = {  # what a field is, for a value of the wrong type or shape
    "prompt": f"a non-empty string, a non-empty list of token ids, or a list of up to {MAX_PROMPTS} of either",
    "stop": f"a non-empty string or a list of up to {MAX_STOP} of them (at most {MAX_STOP_CHARS} characters each)",
    "messages": "a non-empty list of {\"role\", \"content\"} objects",
}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(one line, the field at fault) for pydantic's first error."""
    err = e.errors(include_url=False)[0]
    names = [str(p) for p in err["loc"] if isinstance(p, int) or p.isidentifier()]  # drop union branch tags
    loc = ".".join(names)
    top = names[0] if names else None
    if err["type"] == "extra_forbidden":
        return f"unknown field '{loc}'", loc
    if err["type"] == "missing":
        return f"field '{loc}' is required", loc
    if not loc:
        return err["msg"].removeprefix("Value error, "), None
    got = json.dumps(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if top in _SHAPES and len(err["loc"]) != len(names):
        return f"field '{top}' must be {_SHAPES[top]}, got {got}", top
    return f"field '{loc}': {err['msg']}, got {got}", loc


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


PosInt32 = Annotated[int, Field(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Text = Annotated[str, Field(max_length=MAX_STRING_CHARS)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: accepted, not used


class SamplingFields(_Body):
    """Fields both endpoints share (OpenAI's names and ranges; ``top_k``.. are vLLM's extensions)."""

    model: Annotated[str, Field(max_length=256)] | None = None
    max_tokens: PosInt32 | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 and 0 disable it (vLLM: -1)
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=INT64_MAX)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None  # only empty: not supported
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:{id}"

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


PromptIds = Annotated[list[TokenId], Field(min_length=1, max_length=2**20)]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of ids, or a batch of either."""

    prompt: (Annotated[Text, Field(min_length=1)] | PromptIds
             | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None
    # 0: generate nothing (with echo and logprobs: the prompt's log-probabilities, as OpenAI's legacy
    # completions and vLLM score a text)
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # only equal to n: no server-side ranking
    suffix: None = None  # not supported: only null

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(max_length=256)] | None = None

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}`` as chat templates take it (text parts joined; developer is system)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``; without a length limit it runs until EOS or the context ends.

    OpenAI fields that change nothing here are accepted in their harmless form only: ``store``,
    ``metadata``, ``service_tier``, ``parallel_tool_calls``, ``response_format`` ``{"type": "text"}``,
    ``tools`` empty, ``tool_choice`` ``"none"``/``"auto"``, ``modalities`` ``["text"]``,
    ``prompt_cache_key``, ``safety_identifier``; and null ``audio``, ``prediction``, ``functions``,
    ``function_call``, ``web_search_options``, ``reasoning_effort``, ``verbosity``.
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: PosInt32 | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    store: bool | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    service_tier: Annotated[str, Field(max_length=32)] | None = None
    parallel_tool_calls: bool | None = None
    response_format: TextFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None  # tool calls are not supported
    tool_choice: Literal["none", "auto"] | None = None
    modalities: list[Literal["text"]] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None  # hints for OpenAI's own caching
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None  # and abuse tracking: no effect here
    # features jaxlm does not have, accepted only when null (as clients send them)
    audio: None = None
    prediction: None = None
    functions: None = None
    function_call: None = None
    web_search_options: None = None
    reasoning_effort: None = None
    verbosity: None = None

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_completion_tokens or max_tokens (its older name), not both")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(_Body):
    """vLLM's ``POST /tokenize``: ``prompt`` text, or chat ``messages`` rendered as for a chat request."""

    model: Annotated[str, Field(max_length=256)] | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    """vLLM's ``POST /detokenize``."""

    model: Annotated[str, Field(max_length=256)] | None = None
    tokens: Annotated[list[TokenId], Field(max_length=2**20)]
