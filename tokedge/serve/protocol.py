"""The OpenAI Chat Completions wire format: request validation with one clear message per
problem, and the JSON bodies of responses, stream chunks and errors."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tokedge.safeio import printable

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256  # characters per stop string (text that may start one is held back while streaming)
MAX_SEED = 2**63 - 1  # seeds are 0 .. 2**63-1, as `tokedge run --seed`
MAX_JSON_DEPTH = 32  # nesting of the request body (messages -> content -> part -> image_url is 5)


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
        415: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated request. `messages` are in the chat template's format, with each image part
    replaced by {"type": "image"} and its URL kept, in order, in `image_urls`, and a video part
    (at most one, never beside images) by {"type": "video"} with its URL in `video_urls`."""

    model: str
    messages: list[dict[str, Any]]
    image_urls: list[str]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    video_urls: list[str] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{key}' must be a number (got {type(value).__name__})", param=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a finite number (got {value})", param=key)
    if value > hi or value < lo or (lo_open and value == lo):
        raise APIError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}] (got {value})", param=key)
    return float(value)


def _integer(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer (got {type(value).__name__})", param=key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = str(value) if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
        raise APIError(400, f"'{key}' must be an integer from {lo} to {hi} (got {shown})", param=key)
    return value


def _json_constant(name: str) -> float:
    raise APIError(400, f"the request body contains {name}, which is not JSON; send finite numbers")


def loads(body: bytes) -> Any:
    """The request body -> a JSON value, or APIError(400): invalid JSON or UTF-8, the NaN / Infinity
    literals Python's parser would accept, nesting deeper than MAX_JSON_DEPTH, and strings that are
    not valid Unicode (a lone surrogate escape such as "\\ud800" cannot be encoded or tokenized)."""
    import json

    try:
        data = json.loads(body, parse_constant=_json_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({str(exc)[:200]})") from None
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:  # iterative: the depth bound is what this walk checks
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in value)
    return data


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body contains a string with a lone surrogate (an unpaired \\ud800-"
                                "\\udfff escape); send valid Unicode text") from None


def _media_url(part: dict, kind: str, where: str, example: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise APIError(400, f'{where}.{kind} must be {{"url": "{example}"}}', param=where)
    return url


def _content(message: dict, index: int, image_urls: list[str], video_urls: list[str]) -> list[dict[str, Any]]:
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):  # as a text part: templates such as llava-hf's iterate over parts
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise APIError(400, f"{where} must be a string or a non-empty list of text / image_url / video_url parts",
                       param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            url = _media_url(part, kind, f"{where}[{j}]",
                             "data:image/...;base64,..." if kind == "image_url" else "data:video/mp4;base64,...")
            if message.get("role") != "user":
                raise APIError(400, f"{where}[{j}]: {kind[:5]}s are accepted in user messages only", param=where)
            (image_urls if kind == "image_url" else video_urls).append(url)
            parts.append({"type": kind[:5]})
        elif kind == "video":
            example = '{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}'
            raise APIError(400, f"{where}[{j}]: send a video as {example}", param=where)
        else:
            raise APIError(400, f"{where}[{j}] must be {{\"type\": \"text\", \"text\": ...}}, "
                                f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} or "
                                f"{{\"type\": \"video_url\", \"video_url\": {{\"url\": ...}}}} (got type {kind!r})",
                           param=where)
    return parts


def parse_chat_request(body: Any, *, served_name: str, max_tokens_limit: int, default_max_tokens: int) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or APIError(400/404) naming the first problem."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, f"'model' is required; this server serves '{served_name}'", param="model")
    if model != served_name:
        raise APIError(404, f"model '{printable(model, 100)}' is not served here; this server serves '{served_name}' "
                            "(GET /v1/models)", param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    image_urls: list[str] = []
    video_urls: list[str] = []
    rendered: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with 'role' one of {', '.join(ROLES)}",
                           param="messages")
        role = "system" if message["role"] == "developer" else message["role"]
        rendered.append({"role": role, "content": _content(message, i, image_urls, video_urls)})
    if rendered[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    if len(video_urls) > 1:
        raise APIError(400, f"the request has {len(video_urls)} video_url parts; send one video per request",
                       param="messages")
    if video_urls and image_urls:
        raise APIError(400, "the request has both a video and images; send the video alone (one video_url part) "
                            "or the images without it", param="messages")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise APIError(400, f"'n' must be 1 (got {n}); send separate requests for several answers", param="n")
    max_tokens = _integer(body, "max_completion_tokens")
    max_tokens = _integer(body, "max_tokens") if max_tokens is None else max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not 1 <= max_tokens <= max_tokens_limit:
        raise APIError(400, f"'max_tokens' must be in [1, {max_tokens_limit}] (got {max_tokens})", param="max_tokens")
    stop = body.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str) and stop:
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty strings",
                       param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        longest = max(len(s) for s in stops)
        raise APIError(400, f"a 'stop' string is {longest} characters; this server accepts at most {MAX_STOP_CHARS} "
                            "per stop string", param="stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object such as {\"include_usage\": true}",
                       param="stream_options")
    return ChatRequest(
        model=model, messages=rendered, image_urls=image_urls, video_urls=video_urls, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", 0, MAX_SEED), stop=stops, stream=stream, include_usage=bool(options.get("include_usage")),
    )


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def completion_body(req: ChatRequest, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": req.request_id, "object": "chat.completion", "created": req.created, "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": FINISH_REASONS.get(finish_reason, finish_reason), "logprobs": None}],
        "usage": usage,
    }


def chunk_body(req: ChatRequest, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{
        "index": 0, "delta": delta, "logprobs": None,
        "finish_reason": FINISH_REASONS.get(finish_reason, finish_reason) if finish_reason else None}]
    body: dict[str, Any] = {"id": req.request_id, "object": "chat.completion.chunk", "created": req.created,
                            "model": req.model, "choices": choices}
    if usage is not None or req.include_usage:
        body["usage"] = usage
    return body
