"""Chat with instruct models: render the model's own chat template exactly as transformers does.

The template is the Jinja text Hugging Face keeps in ``tokenizer_config.json`` (``chat_template``)
or ``chat_template.jinja`` beside ``tokenizer.json``; GGUF files carry the same text, and
``jaxlm convert`` writes it there. It is rendered in the Jinja environment transformers builds in
``transformers.utils.chat_template_utils._cached_compile_jinja_template`` (an immutable sandbox
with ``trim_blocks``, ``lstrip_blocks``, ``jinja2.ext.loopcontrols``, and the globals
``raise_exception``, ``strftime_now``, ``dict``, ``namespace`` and the ``tojson`` filter with
transformers' semantics), with the tokenizer's named special tokens (``bos_token``, ``eos_token``,
...) as variables. The prompt ids are the rendered text encoded **without** adding special
tokens, as ``apply_chat_template(..., tokenize=True)`` does: a template that writes
``{{ bos_token }}`` gets exactly one BOS.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import warnings
from datetime import datetime
from typing import Any, Sequence

from tokenizers import Tokenizer

from jaxlm.config import ConfigError, DecodeConfig
from jaxlm.detokenize import decode_continuation
from jaxlm.generate import generate_tokens
from jaxlm.model import Transformer

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": text, ...}

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the variables every template sees
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ConfigError):
    """The chat template could not render these messages (the template's own message)."""


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The template compiled in transformers' chat-template environment (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):  # noqa: A002 - the name templates call it with
        return datetime.now().strftime(format)

    class TemplateDict:  # dict(...) without dict's attributes
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # namespace(...) that refuses underscore attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes, got {name!r}")

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True, **variables: Any) -> str:
    """The prompt text for ``messages``, as ``tokenizer.apply_chat_template(..., tokenize=False)`` renders it.

    ``variables`` are the special tokens (``bos_token``, ...) and any extra template variables.
    Message keys whose value is None are dropped first, as transformers does. Raises
    :class:`ChatTemplateError` with the template's message when it does not render.
    """
    import jinja2

    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(template).render(
            messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from None


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The named special tokens of a ``tokenizer_config.json`` dict (strings or AddedToken dicts)."""
    out = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template with the special tokens it is rendered with."""

    template: str
    variables: dict[str, str]  # bos_token, eos_token, ... from tokenizer_config.json

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt, **self.variables)

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
        """``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)``: the rendered
        text encoded without adding special tokens (the template writes its own)."""
        return tokenizer.encode(self.render(messages), add_special_tokens=False).ids


def tokenizer_config(tokenizer_path: str | pathlib.Path) -> dict[str, Any]:
    folder = pathlib.Path(tokenizer_path).parent
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        if (folder / name).is_file():
            config.update(json.loads((folder / name).read_text()))
    return config


def load_chat_template(tokenizer_path: str | pathlib.Path) -> ChatTemplate | None:
    """The chat template found beside ``tokenizer.json`` (``tokenizer_config.json`` or
    ``chat_template.jinja``), or None when the model has none."""
    folder = pathlib.Path(tokenizer_path).parent
    config = tokenizer_config(tokenizer_path)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not isinstance(template, str) or not template:
        return None
    return ChatTemplate(template, special_tokens(config))


def end_of_turn_id(chat_template: ChatTemplate, tokenizer: Tokenizer) -> int | None:
    """The special token the template puts right after a message's content (``<|im_end|>`` in ChatML),
    or None when it writes none there (or cannot render a one-message conversation)."""
    marker = "\u2063end-of-turn-probe\u2063"
    try:
        text = chat_template.render([{"role": "user", "content": marker}], add_generation_prompt=False)
    except ChatTemplateError as e:
        warnings.warn(f"cannot find the chat template's end-of-turn token ({e})", stacklevel=2)
        return None
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token_id in tokenizer.encode(text.split(marker, 1)[-1], add_special_tokens=False).ids:
        if tokenizer.id_to_token(token_id) in special:
            return token_id
    return None


def chat(
    model: Transformer,
    prompts: Sequence[str | Sequence[Message]],
    cfg: DecodeConfig,
    *,
    tokenizer_path: str | pathlib.Path,
    eos_token_id: Sequence[int] | None = None,
) -> list[str]:
    """One assistant reply per conversation (a bare string is a single user message).

    Stops at any of ``eos_token_id`` (default: the model's EOS set, :func:`jaxlm.interop.eos.eos_token_ids`).
    """
    from jaxlm.interop.eos import eos_token_ids

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    template = load_chat_template(tokenizer_path)
    if template is None:
        raise ConfigError(f"no chat template beside '{tokenizer_path}'; this is not an instruct model, use plain prompts")
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    ids = [template.prompt_ids(tokenizer, c) for c in conversations]
    eos = eos_token_ids(tokenizer_path, tokenizer) if eos_token_id is None else tuple(eos_token_id)
    new = generate_tokens(model, ids, cfg, eos_token_id=eos)
    return [decode_continuation(tokenizer, p, [t for t in seq if t not in eos]) for p, seq in zip(ids, new)]
