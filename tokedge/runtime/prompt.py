"""Prompting without transformers: the chat template rendered with jinja2 as transformers renders
it, the image placeholder expanded to the artifact's visual-token count, and `tokenizers` with the
artifact's tokenizer.json (its post-processor decides BOS)."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tokedge.artifact import PromptInfo
from tokedge.errors import ArtifactError, InputError
from tokedge.safeio import DEFAULT_LIMITS, Limits, printable, read_regular_path

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

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """Every call a template makes (range, filters, methods) checks the render deadline, so
        nested loops cannot run on for ever even where no timer signal can interrupt them."""

        intercepted_binops = frozenset({"*", "**"})

        def call(self, __context, __obj, *args, **kwargs):  # noqa: N807 - jinja2's signature
            _check_deadline()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            """`"x" * n` and `a ** b` cannot build values beyond the render's output bound."""
            _check_deadline()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_VALUE:
                        raise jinja2.exceptions.SecurityError("the template builds a value that is too large")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("the template raises a number to a power that is too large")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


_render_state = threading.local()
_MAX_VALUE = DEFAULT_LIMITS.template_chars


class _RenderTimeout(Exception):
    pass


def _check_deadline() -> None:
    end = getattr(_render_state, "end", None)
    if end is not None and time.monotonic() > end:
        raise _RenderTimeout()


@contextlib.contextmanager
def _render_deadline(seconds: float) -> Iterator[None]:
    """Bound a render's wall time: a deadline checked on every template call and output piece,
    and in the main thread also a timer signal that interrupts pure loops."""
    _render_state.end = time.monotonic() + seconds
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise _RenderTimeout()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        _render_state.end = None


def check_prompt_text(text: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """A user's prompt: non-empty, valid UTF-8 text (no lone surrogates), within the length limit."""
    if not text or not text.strip():
        raise InputError("the prompt is empty; pass --prompt with a question or instruction")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the prompt is not valid UTF-8 text; pass it as UTF-8") from None
    if len(text) > limits.prompt_chars:
        raise InputError(f"the prompt is {len(text)} characters, over the limit of {limits.prompt_chars}; shorten it")


def render_chat(info: PromptInfo, text: str, special_tokens: dict[str, str] | None = None,
                limits: Limits = DEFAULT_LIMITS, images: int = 1) -> str:
    """One user turn with `images` images (one image item each, before the text), generation
    prompt added. Rendering is bounded in output size and wall time (a hostile template cannot
    hang or exhaust memory)."""
    check_prompt_text(text, limits)
    if info.chat_template is None:
        return FALLBACK_TEMPLATE.format(image="\n".join([info.image_token] * images), text=text)
    messages = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]
    return _render_bounded(info.chat_template, limits, messages=messages, add_generation_prompt=True,
                           **(special_tokens or {}))


def _render_bounded(template_text: str, limits: Limits, **context) -> str:
    """Render a chat template bounded in output size and wall time; errors become InputError."""
    pieces: list[str] = []
    size = 0
    try:
        with _render_deadline(limits.template_seconds):
            template = _compile(template_text)
            for piece in template.generate(**context):
                size += len(piece)
                if size > limits.template_chars:
                    raise InputError(f"the artifact's chat template rendered more than {limits.template_chars} "
                                     "characters; it is not a usable chat template (re-export the artifact)")
                _check_deadline()
                pieces.append(piece)
    except _RenderTimeout:
        raise InputError(f"the artifact's chat template took longer than {limits.template_seconds:g} s to render; "
                         "it is not a usable chat template (re-export the artifact)") from None
    except InputError:
        raise
    except RecursionError:
        raise InputError("the artifact's chat template recursed too deeply; re-export the artifact") from None
    except Exception as exc:  # jinja2 errors and sandbox refusals
        raise InputError(f"the artifact's chat template failed to render: {printable(exc, 200)}") from None
    return "".join(pieces)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment (unless TOKEDGE_DEBUG=1): what native
    code prints there (a Rust panic's report and backtrace) never reaches the user; the error
    itself still arrives as an exception and becomes tokedge's one line."""
    import os
    import sys

    if os.environ.get("TOKEDGE_DEBUG") == "1":
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def render_messages(info: PromptInfo, messages: list[dict], special_tokens: dict[str, str] | None = None,
                    limits: Limits = DEFAULT_LIMITS) -> str:
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
    return _render_bounded(info.chat_template, limits, messages=messages, add_generation_prompt=True,
                           **(special_tokens or {}))


def render_video_chat(info: PromptInfo, text: str, video_token: str, special_tokens: dict[str, str] | None = None,
                      limits: Limits = DEFAULT_LIMITS) -> str:
    """One user turn with one video item before the text, generation prompt added (bounded)."""
    check_prompt_text(text, limits)
    if info.chat_template is None:
        return FALLBACK_TEMPLATE.format(image=video_token, text=text)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    return _render_bounded(info.chat_template, limits, messages=messages, add_generation_prompt=True,
                           **(special_tokens or {}))


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # [b, t] int64, left-padded
    attention_mask: np.ndarray  # [b, t] int64


class PromptEncoder:
    """Renders and tokenizes prompts for one artifact."""

    def __init__(self, root: Path, info: PromptInfo, pad_token_id: int | None,
                 special_tokens: dict[str, str] | None = None, tokenizer_json: bytes | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        from tokenizers import Tokenizer

        self.info = info
        self.limits = limits
        if tokenizer_json is None:  # a directory tokedge just wrote (tests, export); artifacts pass verified bytes
            tokenizer_json = read_regular_path(root, info.tokenizer_file, limits.tokenizer_bytes)
        try:
            with _native_stderr_silenced():  # a Rust panic prints its own multi-line report to fd 2
                self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
                self.tokenizer.encode_batch(["probe " + info.image_token], add_special_tokens=True)
        except BaseException as exc:  # tokenizers raises ValueError or a PanicException (a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ArtifactError(f"the artifact's tokenizer ({info.tokenizer_file}) cannot be loaded: "
                                f"{printable(exc, 160)}; re-export the artifact") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.special_tokens = special_tokens or {}

    def expand(self, rendered: str, visual_tokens: int | Sequence[int]) -> str:
        """Each image placeholder of a rendered prompt -> its image's count of them, in order
        (`visual_tokens`: one count per image, or an int for a one-image prompt)."""
        counts = [visual_tokens] if isinstance(visual_tokens, int) else list(visual_tokens)
        pieces = rendered.split(self.info.image_token)
        if len(pieces) - 1 != len(counts):
            images = f"{len(counts)} image{'s' if len(counts) != 1 else ''}"
            raise InputError(
                f"the rendered prompt has {len(pieces) - 1} image placeholders '{self.info.image_token}' for "
                f"{images}; tokedge adds one per image itself (remove the placeholder from --prompt)"
            )
        out = pieces[0]
        for count, piece in zip(counts, pieces[1:]):  # a layout's own text (`layouts.Placeholders`) or a run
            out += getattr(count, "text", None) or self.info.image_token * count
            out += piece
        return out

    def encode(self, prompts: list[str], visual_tokens: int | Sequence[int | Sequence[int]]) -> Encoded:
        """`visual_tokens`: one count for every prompt (one image each), or per prompt an int (one
        image) or a list with one count per image of that prompt (several images)."""
        counts = [visual_tokens] * len(prompts) if isinstance(visual_tokens, int) else list(visual_tokens)
        rendered = [render_chat(self.info, p, self.special_tokens, self.limits,
                                images=1 if isinstance(c, int) else len(c)) for p, c in zip(prompts, counts)]
        return self.encode_rendered(rendered, counts)

    def encode_rendered(self, rendered: list[str], visual_tokens: int | Sequence[int | Sequence[int]]) -> Encoded:
        """Prompts already rendered with the chat template (one placeholder per image) -> ids,
        left-padded. `visual_tokens` as for `encode`."""
        counts = [visual_tokens] * len(rendered) if isinstance(visual_tokens, int) else list(visual_tokens)
        texts = [self.expand(r, k) for r, k in zip(rendered, counts)]
        counts = [k if isinstance(k, int) else sum(k) for k in counts]
        try:
            ids = [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        except BaseException as exc:  # a hostile tokenizer.json can make the Rust side panic
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ArtifactError(f"the artifact's tokenizer failed on this prompt: {printable(exc, 160)}; "
                                "re-export the artifact") from None
        for row, visual_tokens in zip(ids, counts):
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

    def encode_video(self, prompt: str, video_token: str, video_token_id: int, count: int) -> Encoded:
        """One prompt with one video: the chat template's video item expanded to `count` placeholders."""
        rendered = render_video_chat(self.info, prompt, video_token, self.special_tokens, self.limits)
        return self.encode_video_rendered(rendered, video_token, video_token_id, count, where="--prompt")

    def encode_video_rendered(self, rendered: str, video_token: str, video_token_id: int, count: int,
                              where: str = "the messages") -> Encoded:
        """A conversation rendered with one video item (`render_video_chat`, or the server's
        `render_messages`) -> ids with the video item expanded to `count` placeholders."""
        from tokedge.runtime.video import expand_video_placeholders

        if rendered.count(video_token) == 0:
            raise InputError(f"the artifact's chat template renders no '{video_token}' for a video item; it cannot "
                             "place a video (re-export from a checkpoint whose chat template handles videos)")
        if rendered.count(video_token) != 1:
            raise InputError(f"the rendered prompt has {rendered.count(video_token)} video placeholders "
                             f"'{video_token}' for 1 video; tokedge adds it itself (remove it from {where})")
        if self.info.image_token in rendered:
            raise InputError(f"the prompt holds the image placeholder '{self.info.image_token}' but no image is given; "
                             f"remove it from {where}")
        text = expand_video_placeholders(rendered, video_token, [count])
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ArtifactError(f"the artifact's tokenizer failed on this prompt: {printable(exc, 160)}; "
                                "re-export the artifact") from None
        if ids.count(video_token_id) != count:
            raise InputError(f"the tokenizer split the video placeholder '{video_token}' (got "
                             f"{ids.count(video_token_id)} video tokens, expected {count})")
        input_ids = np.asarray([ids], dtype=np.int64)
        return Encoded(input_ids=input_ids, attention_mask=np.ones_like(input_ids))

    def decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ArtifactError(f"the artifact's tokenizer failed to decode: {printable(exc, 160)}") from None
