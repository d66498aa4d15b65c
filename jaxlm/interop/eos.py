"""A model's end-of-sequence set: every token id its authors declare ends generation.

A model declares its end tokens in several places, and generation stops at any of them:

* ``generation_config.json`` ``eos_token_id`` (an int or a list, e.g. Llama 3's
  ``<|end_of_text|>`` and ``<|eot_id|>``), the set ``transformers`` ``generate`` stops at;
* the tokenizer's ``eos_token`` (``tokenizer_config.json``);
* a GGUF file's ``tokenizer.ggml.eos_token_id`` and ``eot_token_id`` (written into
  ``generation_config.json`` by ``jaxlm convert``, :func:`jaxlm.interop.gguf.write_tokenizer_files`);
* the chat template's end-of-turn token (``<|im_end|>`` in ChatML), so an instruct model's
  answer ends there with or without ``--chat``.

A model trained with jaxlm on the embedded tokenizer has the set ``{<|endoftext|>}``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tokenizers import Tokenizer

from jaxlm.data import eos_id as embedded_eos_id


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def generation_config_eos(folder: str | pathlib.Path) -> list[int]:
    """``eos_token_id`` of ``folder/generation_config.json`` as a list (empty when absent)."""
    path = pathlib.Path(folder) / "generation_config.json"
    return _ids(json.loads(path.read_text()).get("eos_token_id")) if path.is_file() else []


def eos_token_ids(tokenizer_path: str | pathlib.Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The sorted EOS set of the model whose ``tokenizer.json`` is ``tokenizer_path`` (see the module
    docstring); ``""`` means the embedded tokenizer. Ids outside the tokenizer's vocabulary are dropped."""
    from jaxlm.interop.chat import tokenizer_config, end_of_turn_id, load_chat_template

    if not tokenizer_path:
        eos = embedded_eos_id(tokenizer)
        return () if eos is None else (eos,)
    folder = pathlib.Path(tokenizer_path).parent
    ids = set(generation_config_eos(folder))
    token = tokenizer_config(tokenizer_path).get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        ids.add(tokenizer.token_to_id(token))
    template = load_chat_template(tokenizer_path)
    end_of_turn = end_of_turn_id(template, tokenizer) if template is not None else None
    if end_of_turn is not None:
        ids.add(end_of_turn)
    if not ids and embedded_eos_id(tokenizer) is not None:  # a bare tokenizer.json: its <|endoftext|>
        ids.add(embedded_eos_id(tokenizer))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return tuple(sorted(i for i in ids if 0 <= i < size))
