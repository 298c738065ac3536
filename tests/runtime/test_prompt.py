"""Prompt rendering (jinja2, as transformers renders chat templates) and tokenisation
(`tokenizers` + tokenizer.json) against transformers' processor."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokedge.artifact import PromptInfo, load_artifact
from tokedge.errors import InputError
from tokedge.runtime.prompt import FALLBACK_TEMPLATE, PromptEncoder, render_chat, render_messages

# llava-hf's published LLaVA-1.5 template, with transformers' {% generation %} extension tag.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

PROMPTS = ["What is shown in this image?", "  spaces  and\nnewlines\t", "ünïcödé ✓ 漢字", "<s> fake special </s>",
           "{{ not jinja }} {% raw %}"]


@pytest.fixture(scope="module")
def encoder(artifacts):
    art = artifacts("cls-attn", 64)
    m = load_artifact(art)
    return PromptEncoder(art, m.prompt, m.model.pad_token_id, m.prompt.special_tokens)


def _conv(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("text", PROMPTS)
def test_render_matches_transformers(encoder, hf_tiny, text):
    _, processor = hf_tiny
    assert render_chat(encoder.info, text, encoder.special_tokens) == processor.apply_chat_template(
        _conv(text), add_generation_prompt=True)


@pytest.mark.parametrize("text", PROMPTS[:3])
def test_llava_hf_template_with_generation_tag(encoder, hf_tiny, text):
    _, processor = hf_tiny
    info = PromptInfo(**{**encoder.info.__dict__, "chat_template": LLAVA_HF_TEMPLATE})
    expected = processor.apply_chat_template(_conv(text), add_generation_prompt=True, chat_template=LLAVA_HF_TEMPLATE)
    assert render_chat(info, text) == expected


CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
]


@pytest.mark.parametrize("template", [None, LLAVA_HF_TEMPLATE])
def test_render_messages_matches_transformers(encoder, hf_tiny, template):
    """A whole conversation (the server's messages), with the artifact's and llava-hf's templates."""
    _, processor = hf_tiny
    info = encoder.info if template is None else PromptInfo(**{**encoder.info.__dict__, "chat_template": template})
    expected = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, chat_template=template)
    assert render_messages(info, CONVERSATION, encoder.special_tokens) == expected
    assert render_messages(info, _conv("Hi there"), encoder.special_tokens) == render_chat(
        info, "Hi there", encoder.special_tokens)


def test_render_messages_without_a_template_matches_the_fallback(encoder):
    info = PromptInfo(**{**encoder.info.__dict__, "chat_template": None})
    assert render_messages(info, _conv("Hi there")) == FALLBACK_TEMPLATE.format(image="<image>", text="Hi there")


def test_ids_match_transformers_processor(encoder, hf_tiny, test_images):
    _, processor = hf_tiny
    texts = [processor.apply_chat_template(_conv(p), add_generation_prompt=True) for p in PROMPTS[:3]]
    processor.tokenizer.padding_side = "left"
    enc = processor(images=test_images, text=texts, padding=True, return_tensors="np")
    ours = encoder.encode(PROMPTS[:3], 576)
    assert ours.input_ids.tolist() == enc["input_ids"].tolist()
    assert ours.attention_mask.tolist() == enc["attention_mask"].tolist()
    assert ours.input_ids[0, 0] in (encoder.pad_token_id, 1)


def test_placeholder_in_user_text_refused(encoder):
    with pytest.raises(InputError, match="image placeholders"):
        encoder.encode(["look at <image> please"], 64)


def test_empty_prompt_refused(encoder):
    with pytest.raises(InputError, match="empty"):
        encoder.encode(["   "], 64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=80).filter(lambda t: t.strip() and "<image>" not in t))
def test_property_any_text_renders_and_encodes(encoder, text):
    enc = encoder.encode([text], 16)
    assert (enc.input_ids == encoder.info.image_token_id).sum() == 16
    assert enc.attention_mask.all()
