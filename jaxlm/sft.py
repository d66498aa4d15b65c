"""Supervised fine-tuning data: chat conversations -> token ids and per-token assistant labels.

A row of an SFT JSONL file is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI
roles ``system``, ``user``, ``assistant``; any number of turns) or ``{"prompt": ..., "completion":
...}`` (one user turn and one assistant turn). Each conversation is rendered with the model's own
chat template (:mod:`jaxlm.interop.chat`, transformers' Jinja environment) and encoded without
adding special tokens, as ``apply_chat_template(..., tokenize=True)`` does.

**Which tokens are the assistant's.** transformers' ``return_assistant_tokens_mask`` (and TRL's
``assistant_only_loss``) read ``{% generation %}`` blocks, which most shipped templates lack. Here
the assistant spans come from rendering prefixes of the conversation and diffing them, a rule that
needs no markup in the template:

* for the assistant message ``i``, ``before = render(messages[:i], add_generation_prompt=True)``
  (the prompt a model answers, ending with the assistant header) and ``through =
  render(messages[:i + 1])``; both must be prefixes of ``render(messages)``, else the row is
  refused (the template renders a turn differently depending on what follows it);
* the span is ``through[len(before):]`` with the whitespace at its two ends removed: the answer
  plus everything the template writes after it up to the next turn, i.e. its end-of-turn token(s)
  (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), but not the newline ChatML puts after ``<|im_end|>``;
* a token is an assistant token when its characters (``Encoding.offsets``) overlap a span.

Labels, one uint8 per token: 0 not the assistant's, 1 an assistant turn, 2 the last assistant turn.
``data.loss_on`` picks what is trained from them at training time: ``assistant`` (labels 1 and 2,
the default), ``last_turn`` (label 2) or ``all`` (every token of the conversation).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

from jaxlm.errors import DataError
from jaxlm.interop.chat import ChatTemplate, ChatTemplateError, Message

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all", "last_turn")
NOT_ASSISTANT, ASSISTANT, LAST_ASSISTANT = 0, 1, 2  # the stored labels


def conversation(row: Any, where: str) -> list[Message]:
    """The messages of one JSONL row (``messages``, or ``prompt`` + ``completion``).

    Raises DataError naming ``where`` (``file:line``) for an unknown role, a content that is not a
    string, an empty conversation or one without an assistant turn.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object with 'messages' or 'prompt' and 'completion'")
    if "messages" in row and ("prompt" in row or "completion" in row):
        raise DataError(f"{where}: the row has both 'messages' and 'prompt'/'completion'; keep one form per row")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' is empty or not a list; give at least one user and one assistant message")
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise DataError(f"{where}: the row has neither 'messages' nor 'prompt' and 'completion' (keys: "
                        f"{', '.join(map(str, row)) or 'none'})")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"{where}: message {k} has role {role!r}; roles are {', '.join(ROLES)}")
        if "content" not in m:
            raise DataError(f"{where}: message {k} ({m['role']}) has no 'content'; give its text as a string")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {k} ({m['role']}) has content of type "
                            f"{type(m['content']).__name__}; it must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message; there is nothing to train on")
    return out


def iter_conversations(path: pathlib.Path) -> Iterator[tuple[str, list[Message]]]:
    """``(file:line, messages)`` of every non-blank line of a JSONL file; DataError on a bad line."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where} is not UTF-8 text (byte {e.start} of the line); convert the file to UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as e:
                raise DataError(f"{where} is not valid JSON ({e})") from None
            yield where, conversation(row, where)


def assistant_spans(template: ChatTemplate, messages: list[Message], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the rendered conversation and the ``[start, end)`` character span of every
    assistant turn (its content and end-of-turn marker; the rule is in the module docstring).

    Raises DataError when the template fails on these messages or does not render prefixes of
    the conversation as prefixes of its text.
    """
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True)
            through = template.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    f"{where}: the chat template renders message {i} differently when later messages follow, so its "
                    "assistant tokens cannot be found by rendering prefixes; train on it with data.loss_on=all"
                )
            start, end = len(before), len(through)
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            spans.append((start, end))
    except ChatTemplateError as e:
        raise DataError(f"{where}: {e}") from None
    return text, spans


def encode_conversation(
    template: ChatTemplate, tokenizer: Tokenizer, messages: list[Message], where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n] int64, labels [n] uint8)`` of one conversation: the rendered text encoded without
    adding special tokens, and per token 0 / 1 / 2 (not assistant / assistant / last assistant turn)."""
    text, spans = assistant_spans(template, messages, where)
    enc = tokenizer.encode(text, add_special_tokens=False)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    labels = np.zeros(len(enc.ids), np.uint8)
    for k, (a, b) in enumerate(spans):
        inside = (offsets[:, 0] < b) & (offsets[:, 1] > a)
        labels[inside] = LAST_ASSISTANT if k == len(spans) - 1 else ASSISTANT
    return np.asarray(enc.ids, dtype=np.int64), labels


def trained(labels: np.ndarray, loss_on: str) -> np.ndarray:
    """Bool ``[n]``: which tokens ``data.loss_on`` trains, from stored labels ``[n]``."""
    if loss_on == "assistant":
        return labels >= ASSISTANT
    if loss_on == "last_turn":
        return labels == LAST_ASSISTANT
    if loss_on == "all":
        return np.ones(labels.shape, bool)
    raise ValueError(f"loss_on {loss_on!r} is not one of {', '.join(LOSS_ON)}")
