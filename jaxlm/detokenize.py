"""Incremental detokenization: the text of generated ids, read against the ids before them.

Decoding only the new ids loses what a token means in context: SentencePiece-style tokenizers
(Llama 2, Mistral) drop the leading space of the first decoded token, and a character split over
several byte tokens decodes to U+FFFD until its last byte arrives. So the text of the generated
ids is the *difference* ``decode(prompt + generated)[len(decode(prompt)):]`` (as vLLM and
text-generation-inference do), and text ending in U+FFFD (an incomplete UTF-8 sequence) is held
back until the sequence completes or generation ends. The CLI, the serving engine and every
stream use this one class, so the concatenated stream equals the non-streamed text.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 byte sequence to


class IncrementalDetokenizer:
    """Feed generated ids with :meth:`push`; read the text that is final so far.

    ``text`` is the whole generated text decoded so far (``decode(prompt + ids)`` minus the
    prompt's text, special tokens skipped as ``Tokenizer.decode`` does by default);
    ``stable`` is how much of it cannot change any more (trailing U+FFFD held back).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self._ids = [int(t) for t in prompt_ids]
        self._start = len(tokenizer.decode(self._ids))
        self.text = ""

    @property
    def stable(self) -> int:
        """Characters of :attr:`text` that are final (an incomplete trailing character is not)."""
        return len(self.text.rstrip(REPLACEMENT))

    def push(self, ids: Sequence[int]) -> str:
        """Add generated ids; returns the text that became final with them."""
        before = self.stable
        self._ids.extend(int(t) for t in ids)
        self.text = self.tokenizer.decode(self._ids)[self._start:]
        return self.text[before:self.stable]


def decode_continuation(tokenizer: Tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text of ``new_ids`` following ``prompt_ids``: ``decode(prompt + new)[len(decode(prompt)):]``."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    detok.push(new_ids)
    return detok.text
