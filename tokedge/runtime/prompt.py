"""Prompting without transformers: the chat template rendered with jinja2 as transformers renders
it, the image placeholder expanded to the artifact's visual-token count, and `tokenizers` with the
artifact's tokenizer.json (its post-processor decides BOS)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from tokedge.artifact import PromptInfo
from tokedge.errors import InputError

FALLBACK_TEMPLATE = "USER: {image}\n{text} ASSISTANT:"


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (a transformers extension): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(info: PromptInfo, text: str, special_tokens: dict[str, str] | None = None) -> str:
    """One user turn with one image, generation prompt added."""
    if not text or not text.strip():
        raise InputError("the prompt is empty; pass --prompt with a question or instruction")
    if info.chat_template is None:
        return FALLBACK_TEMPLATE.format(image=info.image_token, text=text)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    try:
        return _compile(info.chat_template).render(
            messages=messages, add_generation_prompt=True, **(special_tokens or {})
        )
    except Exception as exc:  # jinja2 errors and sandbox refusals
        raise InputError(f"the artifact's chat template failed to render: {exc}") from None


def render_messages(info: PromptInfo, messages: list[dict], special_tokens: dict[str, str] | None = None) -> str:
    """A whole conversation in the template's message format (content: a string or a list of
    {"type": "text", "text": ...} / {"type": "image"} parts), generation prompt added."""
    if info.chat_template is None:
        turns = []
        for message in messages:
            parts = message["content"] if isinstance(message["content"], list) else [
                {"type": "text", "text": message["content"]}]
            body = "".join(info.image_token + "\n" if p["type"] == "image" else p["text"] for p in parts)
            turns.append(body if message["role"] == "system" else f"{message['role'].upper()}: {body}")
        return " ".join(turns) + " ASSISTANT:"
    try:
        return _compile(info.chat_template).render(messages=messages, add_generation_prompt=True, **(special_tokens or {}))
    except Exception as exc:  # jinja2 errors and sandbox refusals
        raise InputError(f"the artifact's chat template failed to render these messages: {exc}") from None


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # [b, t] int64, left-padded
    attention_mask: np.ndarray  # [b, t] int64


class PromptEncoder:
    """Renders and tokenizes prompts for one artifact."""

    def __init__(self, root: Path, info: PromptInfo, pad_token_id: int | None,
                 special_tokens: dict[str, str] | None = None):
        from tokenizers import Tokenizer

        self.info = info
        self.tokenizer = Tokenizer.from_file(str(root / info.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.special_tokens = special_tokens or {}

    def expand(self, rendered: str, visual_tokens: int) -> str:
        count = rendered.count(self.info.image_token)
        if count != 1:
            raise InputError(
                f"the rendered prompt has {count} image placeholders '{self.info.image_token}'; "
                "tokedge takes one image per prompt (remove the placeholder from --prompt)"
            )
        return rendered.replace(self.info.image_token, self.info.image_token * visual_tokens)

    def encode(self, prompts: list[str], visual_tokens: int) -> Encoded:
        return self.encode_rendered([render_chat(self.info, p, self.special_tokens) for p in prompts], visual_tokens)

    def encode_rendered(self, rendered: list[str], visual_tokens: int) -> Encoded:
        """Prompts already rendered with the chat template (one placeholder each) -> ids, left-padded."""
        texts = [self.expand(r, visual_tokens) for r in rendered]
        ids = [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        for row in ids:
            if row.count(self.info.image_token_id) != visual_tokens:
                raise InputError(
                    f"the tokenizer split the image placeholder '{self.info.image_token}' (got "
                    f"{row.count(self.info.image_token_id)} image tokens, expected {visual_tokens})"
                )
        width = max(len(r) for r in ids)
        input_ids = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        return Encoded(input_ids=input_ids, attention_mask=mask)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
