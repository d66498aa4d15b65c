"""Chat with instruct models: render the model's own chat template, stop at its end-of-turn token.

The template is the Jinja text Hugging Face keeps in ``tokenizer_config.json`` (``chat_template``)
or ``chat_template.jinja`` beside ``tokenizer.json``; GGUF files carry the same text, and
``jaxlm convert`` writes it there. It is rendered in a sandbox, as ``transformers`` does.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

from tokenizers import Tokenizer

from jaxlm.config import ConfigError, DecodeConfig
from jaxlm.generate import generate_tokens
from jaxlm.model import Transformer

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


def load_chat_template(tokenizer_path: str | pathlib.Path) -> tuple[str, dict[str, Any]]:
    """(template, tokenizer_config) found beside ``tokenizer.json``; ConfigError when there is none."""
    folder = pathlib.Path(tokenizer_path).parent
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = config.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not isinstance(template, str) or not template:
        raise ConfigError(f"no chat template beside '{tokenizer_path}'; this is not an instruct model, use plain prompts")
    return template, config


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for ``messages``, as the model was trained to see it."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as e:
        raise ConfigError(f"the chat template failed to render: {e}") from None


def _special(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def end_of_turn_id(template: str, tokenizer: Tokenizer, config: dict[str, Any]) -> int:
    """The special token the template puts right after a message's content (``<|im_end|>`` in ChatML)."""
    marker = "\u2063end-of-turn-probe\u2063"
    text = render_chat(template, [{"role": "user", "content": marker}], add_generation_prompt=False, **_special(config))
    after = text.split(marker, 1)[-1]
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token_id in tokenizer.encode(after, add_special_tokens=False).ids:
        if tokenizer.id_to_token(token_id) in special:
            return token_id
    eos = _special(config).get("eos_token")
    if eos is None or tokenizer.token_to_id(eos) is None:
        raise ConfigError("the chat template ends a turn with no special token and no eos_token is configured")
    return tokenizer.token_to_id(eos)


def chat_renderer(tokenizer_path: str | pathlib.Path, tokenizer: Tokenizer):
    """``(render(messages) -> prompt text, end-of-turn id)`` for a model with a chat template, else None."""
    try:
        template, config = load_chat_template(tokenizer_path)
    except ConfigError:
        return None
    special = _special(config)
    return (lambda messages: render_chat(template, messages, **special)), end_of_turn_id(template, tokenizer, config)


def chat(
    model: Transformer,
    prompts: Sequence[str | Sequence[Message]],
    cfg: DecodeConfig,
    *,
    tokenizer_path: str | pathlib.Path,
) -> list[str]:
    """One assistant reply per conversation (a bare string is a single user message)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    template, config = load_chat_template(tokenizer_path)
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    texts = [render_chat(template, c, **_special(config)) for c in conversations]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    eot = end_of_turn_id(template, tokenizer, config)
    new = generate_tokens(model, ids, cfg, eos_id=eot)
    return [tokenizer.decode([t for t in seq if t != eot]) for seq in new]
