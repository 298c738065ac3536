"""The HTTP side of `tokedge serve`: a Starlette app on uvicorn in front of the scheduler.

Routes: POST /v1/chat/completions (JSON or Server-Sent Events), GET /v1/models, GET /health
(200 only once the artifact is verified and loaded), GET /metrics (Prometheus text). With an API
key every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokedge.errors import InputError, TokedgeError, UsageError
from tokedge.layouts import ImageBatch, layout_of
from tokedge.runtime.generate import SamplingConfig, context_limit
from tokedge.runtime.pipeline import Pipeline
from tokedge.runtime.prompt import render_messages
from tokedge.safeio import printable
from tokedge.serve.config import ServeConfig, is_loopback
from tokedge.serve.images import (
    IMAGE,
    VIDEO,
    check_request_pixels,
    decode_image,
    fetch_remote,
    image_bytes,
    is_remote,
    open_image,
    release_memory,
)
from tokedge.serve.metrics import CONTENT_TYPE, Metrics
from tokedge.serve.protocol import (
    FINISH_REASONS,
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    loads,
    parse_chat_request,
)
from tokedge.serve.scheduler import Delta, Done, Event, Failed, Job, QueueFull, Scheduler
from tokedge.serve.video import video_job_inputs, video_refusal

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


MAX_IMAGES_PER_PROMPT = 8  # images are fetched and decoded before the prompt length is known
LARGE_REQUEST_PIXELS = 4_000_000  # after a request with more pixels than this, freed heap goes back to the OS


def images_per_prompt(pipe: Pipeline) -> int:
    """How many images one request may carry (each becomes its own image item of the prompt)."""
    return MAX_IMAGES_PER_PROMPT


def text_only_support(pipe: Pipeline) -> str | None:
    """None when the artifact answers a prompt without images, else why not. Probed once at load
    with one real prefill of a text-only chat turn through the batch decoder the scheduler uses."""
    from tokedge.runtime.stepwise import BatchDecoder

    try:
        rendered = render_messages(pipe.manifest.prompt, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                   pipe.manifest.prompt.special_tokens)
        enc = pipe.encoder.encode_rendered([rendered], [[]])
        BatchDecoder(pipe.graphs, ImageBatch([], [[]]), enc.input_ids, enc.attention_mask,
                     [SamplingConfig(max_new_tokens=1)]).prefill()
    except Exception as exc:  # noqa: BLE001 - the reason is what a text-only request is told
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {printable(first, 200)}"
    return None


def vision_inputs(pipe: Pipeline, images: list) -> tuple[Any, list[int]]:
    """A request's images (message order, opened lazily by `images.open_image`: only their headers
    read) -> the vision graph's inputs (`layouts.ImageBatch`, as the artifact's layout prepares one
    prompt's images) and each image's placeholder count. The images are decoded one after the
    other (all of them within --max-request-pixels) and closed as soon as the layout has built its
    inputs, so their pixels are not kept while the request waits for a batch."""
    decoded: list = []
    try:
        for image in images:
            decoded.append(decode_image(image))
        batch = layout_of(pipe.manifest).prepare([decoded], None, pipe.visual_tokens_for)
    finally:
        for image in [*decoded, *images]:
            image.close()
    return batch, batch.counts[0]


class Stage:
    """One bounded stage of preparing requests (remote fetches, image decoding): at most `slots`
    at once, each on a thread of the stage's own (never Starlette's shared pool, which stays free
    for everything else); the rest wait without holding a thread. `/health` calls it stalled once
    every slot has been in use for longer than `ServeConfig.stall_s`."""

    def __init__(self, name: str, slots: int):
        self.name, self.slots = name, slots
        self._entry, self._threads = anyio.CapacityLimiter(slots), anyio.CapacityLimiter(slots)
        self._since: dict[int, float] = {}

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._entry:
            token = object()
            self._since[id(token)] = time.monotonic()
            try:
                return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)
            finally:
                del self._since[id(token)]

    def stalled(self, after_s: float) -> bool:
        since = list(self._since.values())
        return len(since) >= self.slots and max(since) < time.monotonic() - after_s


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Service:
    """The loaded artifact, its scheduler and metrics. Loading runs in a background thread so that
    /health can answer (503) while the artifact is verified and its sessions are created."""

    def __init__(self, cfg: ServeConfig, loader: Callable[[], Pipeline] | None = None):
        from tokedge.runtime.backends import Backend

        self.cfg = cfg
        self.loader = loader or (lambda: Pipeline.load(cfg.artifact, backend=cfg.runtime or Backend(threads=cfg.threads)))
        self.metrics = Metrics()
        self.pipe: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.text_only_refusal: str | None = None  # why prompts without images cannot be answered (None: they can)
        self.on_load_failure: Callable[[], None] = lambda: None
        self.on_ready: Callable[[], None] = lambda: None
        self.stages = [Stage("remote image fetch", cfg.max_remote_fetches),
                       Stage("image preprocessing", cfg.max_preprocess)]
        self.uploads = anyio.CapacityLimiter(cfg.max_uploads)  # bodies held in memory while they arrive
        # one line per request (`request_line`) on stderr; None with --no-request-log
        self.log_request: Callable[[str], None] | None = _stderr_line if cfg.request_log else None

    def load(self) -> None:
        try:
            pipe = self.loader()  # Pipeline.load checks format version and every file's sha256
            self.pipe = pipe
            if self.cfg.warmup:
                from PIL import Image

                pipe.generate(Image.new("RGB", (64, 64), (127, 127, 127)), "Hello", max_new_tokens=1)
            self.text_only_refusal = text_only_support(pipe)  # one short text-only prefill, warm-up or not
            m = pipe.manifest.model
            self.scheduler = Scheduler(
                pipe.graphs, pipe.encoder.decode, self.metrics, max_batch=self.cfg.max_batch,
                max_queue=self.cfg.max_queue, batch_wait_s=self.cfg.batch_wait_ms / 1e3,
                context_limit=context_limit(pipe.graphs), pad_token_id=m.pad_token_id or 0)
            self.scheduler.start()
        except BaseException as exc:  # noqa: BLE001 - reported by /health and the exit code
            self.load_error = exc
            self.on_load_failure()
            return
        self.metrics.set("tokedge_ready", 1)
        self.ready.set()
        self.on_ready()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.pipe is not None:
            self.pipe.close()

    def stalled(self) -> str | None:
        """Why the server cannot make progress, or None: the scheduler thread died, or every slot of
        a preparation stage has been in use for longer than `stall_s`."""
        if self.scheduler is not None and not self.scheduler.alive:
            return "the scheduler thread has stopped"
        for stage in self.stages:
            if stage.stalled(self.cfg.stall_s):
                return f"all {stage.slots} {stage.name} slots have been busy for over {self.cfg.stall_s:g} s"
        return None

    async def prepare_async(self, req: ChatRequest, sink: Callable[[Event], None], arrived: float) -> Job:
        """`prepare` on the preprocessing stage, after the request's remote images (if any) were
        fetched on the fetch stage, one at a time."""
        assert self.pipe is not None
        self.check_media(req)
        fetches, preparing = self.stages
        fetched: dict[int, bytes] = {}
        media = VIDEO if req.video_urls else IMAGE
        for i, url in enumerate(req.video_urls or req.image_urls):
            if is_remote(url) and self.cfg.allow_remote_images:
                fetched[i] = await fetches.run(fetch_remote, url, self.cfg, media)
        return await preparing.run(self.prepare, req, sink, arrived, fetched)

    def check_media(self, req: ChatRequest) -> None:
        """The request's images or video against what the artifact takes (400 naming what to send)."""
        assert self.pipe is not None
        family, allowed = self.pipe.manifest.model.family, images_per_prompt(self.pipe)
        if req.video_urls:
            if self.pipe.manifest.video is None:
                raise video_refusal(self.pipe.manifest)
            return
        if not req.image_urls and self.text_only_refusal is not None:
            raise APIError(400, f"this artifact ({family}) cannot answer a prompt without an image "
                                f"({self.text_only_refusal}): add an image_url part to the user message",
                           param="messages")
        if len(req.image_urls) > allowed:
            raise APIError(400, f"the request has {len(req.image_urls)} images; this server takes at most {allowed} "
                                "image_url parts per request", param="messages")

    def prepare(self, req: ChatRequest, sink: Callable[[Event], None], arrived: float,
                fetched: dict[int, bytes] | None = None) -> Job:
        """Images read and preprocessed, messages rendered and tokenized, limits checked.
        `arrived` (perf_counter) is when the request body was in: TTFT counts from there;
        `fetched`: the bytes of remote images by position. Every image's header is read (format,
        pixels) and the request's pixel budget checked before any image is decoded."""
        assert self.pipe is not None
        pipe, cfg = self.pipe, self.cfg
        self.check_media(req)
        fetched = fetched or {}
        if req.video_urls:
            return self.prepare_video(req, sink, arrived, fetched)
        images = []
        for i, url in enumerate(req.image_urls):
            images.append(open_image(fetched.pop(i) if i in fetched else image_bytes(url, cfg), cfg))
        pixels = check_request_pixels(images, cfg)
        try:
            pixel_values, counts = vision_inputs(pipe, images) if images else (ImageBatch([], [[]]), [])
            rendered = render_messages(pipe.manifest.prompt, req.messages, pipe.manifest.prompt.special_tokens)
            enc = pipe.encoder.encode_rendered([rendered], [counts])
        except InputError as exc:
            raise APIError(400, str(exc), param="messages") from None
        finally:
            del images
            if pixels > LARGE_REQUEST_PIXELS:
                release_memory()
        sampling = self.sampling(req, int(enc.input_ids.shape[1]), "image")
        return Job(pixel_values=pixel_values, input_ids=enc.input_ids[0], sampling=sampling, stop=req.stop, sink=sink,
                   created=arrived)

    def prepare_video(self, req: ChatRequest, sink: Callable[[Event], None], arrived: float,
                      fetched: dict[int, bytes]) -> Job:
        """A video request: the clip read and sampled as `tokedge run --video` reads one (the
        artifact's default frame count, or --video-frames), the messages rendered with the
        template's video item and its placeholders expanded to the plan's count."""
        assert self.pipe is not None
        pipe, cfg = self.pipe, self.cfg
        data = fetched.pop(0) if 0 in fetched else image_bytes(req.video_urls[0], cfg, VIDEO)
        inputs, plan = video_job_inputs(pipe.manifest, data, cfg)
        del data
        info = pipe.manifest.video
        assert info is not None
        try:
            rendered = render_messages(pipe.manifest.prompt, req.messages, pipe.manifest.prompt.special_tokens)
            enc = pipe.encoder.encode_video_rendered(rendered, info.video_token, info.video_token_id, plan.placeholders)
        except InputError as exc:
            raise APIError(400, str(exc), param="messages") from None
        sampling = self.sampling(req, int(enc.input_ids.shape[1]), "video")
        return Job(pixel_values=ImageBatch([], [[]]), input_ids=enc.input_ids[0], sampling=sampling, stop=req.stop,
                   sink=sink, created=arrived, video=(inputs, plan))

    def sampling(self, req: ChatRequest, prompt_tokens: int, media: str) -> SamplingConfig:
        """The request's sampling settings, once its prompt length is within the server's and the model's limits."""
        assert self.pipe is not None
        cfg = self.cfg
        if prompt_tokens > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens ({media} included); this server accepts at most "
                                f"{cfg.max_prompt_tokens} (--max-prompt-tokens); shorten the messages"
                                + (" or lower --video-frames" if media == "video" else ""),
                           param="messages")
        limit = context_limit(self.pipe.graphs)
        if prompt_tokens + req.max_tokens > limit:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens, {media} included) + max_tokens ({req.max_tokens}) "
                                f"exceeds the model's context of {limit} tokens; lower max_tokens",
                           param="max_tokens")
        sampling = SamplingConfig(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed)
        try:
            sampling.check()
        except InputError as exc:
            raise APIError(400, str(exc)) from None
        return sampling


# -- HTTP -------------------------------------------------------------------------------------------

QUIET_PATHS = ("/health", "/metrics")  # probes and scrapes: logged only when they fail
LOG_KEY = "tokedge.request"  # the scope entry a route fills with what the request log line reports


def request_line(method: str, path: str, record: dict[str, Any], total_s: float) -> str:
    """The request log line (stderr, one per request, `--no-request-log` turns it off): method,
    path, status, client, then for chat completions the request id, prompt / visual / completion
    tokens, TTFT, total time, finish reason and whether it streamed; an error's message last."""
    fields = [f"tokedge serve: {method} {printable(path, 100)} {record.get('status') or '-'}"]
    if record.get("client"):
        fields.append(f"client={record['client']}")
    for key in ("id", "prompt_tokens", "visual_tokens", "completion_tokens"):
        if key in record:
            fields.append(f"{key}={record[key]}")
    if "ttft_s" in record:
        fields.append(f"ttft_ms={record['ttft_s'] * 1e3:.1f}")
    fields.append(f"total_ms={total_s * 1e3:.1f}")
    for key in ("finish", "stream"):
        if key in record:
            value = record[key]
            fields.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    if record.get("error"):
        fields.append(f"error={json.dumps(printable(record['error'], 300))}")
    return " ".join(fields)


def _log_done(record: dict[str, Any] | None, done: Done) -> None:
    if record is not None:
        record.update(prompt_tokens=done.prompt_tokens, visual_tokens=done.visual_tokens,
                      completion_tokens=done.completion_tokens, ttft_s=done.ttft_s,
                      finish=FINISH_REASONS.get(done.finish_reason, done.finish_reason))


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _split_host(value: str) -> str:
    """A Host header or an Origin's authority ('name', 'name:port', '[::1]:port') -> the host name."""
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _origin_authority(origin: str) -> str | None:
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        return None  # "null" (sandboxed pages, file://) and anything malformed
    return rest


class _Gate:
    """ASGI middleware in front of every route: refuses requests a web page could have sent
    (a foreign `Host` on a loopback bind, which is what DNS rebinding produces; a foreign `Origin`),
    checks the API key, and counts every answered request by path and status."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service
        key = service.cfg.api_key
        self.expected = key.encode() if key else None
        self.loopback = is_loopback(service.cfg.host)

    def refusal(self, headers: dict[bytes, bytes]) -> APIError | None:
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if self.loopback and host and not is_loopback(_split_host(host)):
            return APIError(403, f"Host '{printable(host, 100)}' is not this server's: a server bound to loopback "
                                 "answers only Host localhost, 127.0.0.1 or [::1] (a foreign Host is a DNS-rebinding "
                                 "web page)", code="forbidden_host")
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1").strip().lower()
            authority = _origin_authority(text)
            same = authority is not None and (is_loopback(_split_host(authority)) if self.loopback
                                              else authority == host)
            if not same:
                return APIError(403, f"cross-origin request from '{printable(text, 100)}' refused: this server "
                                     "answers no web page of another origin", code="forbidden_origin")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        client = scope.get("client")
        record: dict[str, Any] = {"client": f"{client[0]}:{client[1]}" if client else None}
        scope[LOG_KEY] = record
        try:
            await self._answer(scope, receive, send, record)
        finally:
            log = self.service.log_request
            if log is not None and (scope["path"] not in QUIET_PATHS or (record.get("status") or 0) >= 400):
                log(request_line(scope.get("method", "-"), scope["path"], record, time.perf_counter() - start))

    async def _answer(self, scope, receive, send, record: dict[str, Any]) -> None:
        path = scope["path"] if scope["path"] in ROUTES else "other"
        metrics = self.service.metrics

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                code = str(message["status"])
                record["status"] = message["status"]
                metrics.inc("tokedge_requests", path=path, code=code)
                if message["status"] >= 400:
                    metrics.inc("tokedge_request_errors", path=path, code=code)
            await send(message)

        headers = dict(scope["headers"])
        refused = self.refusal(headers)
        if refused is not None:
            record["error"] = refused.message
            await _error(refused)(scope, receive, counted)
            return
        if self.expected is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                       else "incorrect API key in the Authorization header")
                record["error"] = msg
                await _error(APIError(401, msg, code="invalid_api_key"))(scope, receive, counted)
                return
        await self.app(scope, receive, counted)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body within `limit` bytes and `timeout` seconds (408 after: a stalled upload neither
    holds its part nor delays shutdown). A client that leaves mid-body raises ClientDisconnect."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the request body must be sent as Content-Type: application/json (got "
                            f"'{printable(kind, 60) or 'none'}')")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {printable(declared, 30)} bytes; this server accepts at most {limit} "
                            "(images count after base64; see --max-image-bytes)")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes, this server's limit "
                                    "(images count after base64; see --max-image-bytes)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (--request-timeout)",
                       code="timeout") from None
    return b"".join(chunks)


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _events(job: Job, queue: asyncio.Queue, receive) -> AsyncGenerator[Event, None]:
    """The job's events until it is done; stops early (cancelling the job) when the client leaves."""
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return
            event = get.result()
            yield event
            if isinstance(event, (Done, Failed)):
                return
    finally:
        gone.cancel()
        job.cancel()  # no-op for a finished job; stops a running or queued one


class _EventStream:
    """Server-Sent Events as OpenAI sends them: a role chunk, content chunks, a finish chunk, an
    optional usage chunk (stream_options.include_usage), then `data: [DONE]`."""

    def __init__(self, req: ChatRequest, job: Job, queue: asyncio.Queue):
        self.req, self.job, self.queue = req, job, queue

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def emit(data: str, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": more})

        events = _events(self.job, self.queue, receive)
        try:
            await emit(json.dumps(chunk_body(self.req, {"role": "assistant", "content": ""})))
            async for event in events:
                if isinstance(event, Delta):
                    await emit(json.dumps(chunk_body(self.req, {"content": event.text})))
                elif isinstance(event, Done):
                    _log_done(scope.get(LOG_KEY), event)
                    await emit(json.dumps(chunk_body(self.req, {}, event.finish_reason)))
                    if self.req.include_usage:
                        await emit(json.dumps(chunk_body(self.req, None, usage=event.usage())))
                else:
                    record = scope.get(LOG_KEY)
                    if record is not None:
                        record["error"] = event.message
                    await emit(json.dumps(APIError(500, event.message).body()))
            await emit("[DONE]", more=False)
        except OSError:  # the client went away while we were writing
            self.job.cancel()
        finally:
            await events.aclose()


def create_app(service: Service) -> Any:
    cfg = service.cfg

    async def chat(request: Request) -> Any:
        if not service.ready.is_set():
            raise APIError(503, "the model is still loading; retry when GET /health answers 200", code="loading")
        async with service.uploads:
            body = await _read_body(request, cfg.max_body_bytes, cfg.request_timeout_s)
        arrived = time.perf_counter()
        data = loads(body)
        del body
        req = parse_chat_request(data, served_name=cfg.served_name, max_tokens_limit=cfg.max_tokens_limit,
                                 default_max_tokens=cfg.default_max_tokens)
        record = request.scope.get(LOG_KEY)
        if record is not None:
            record.update(id=req.request_id, stream=req.stream)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = await service.prepare_async(req, sink, arrived)
        assert service.scheduler is not None
        try:
            service.scheduler.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry shortly", code="queue_full") from None
        if req.stream:
            return _EventStream(req, job, queue)
        async with contextlib.aclosing(_events(job, queue, request.receive)) as events:
            async for event in events:
                if isinstance(event, Done):
                    _log_done(record, event)
                    return JSONResponse(completion_body(req, event.text, event.finish_reason, event.usage()))
                if isinstance(event, Failed):
                    raise APIError(500, event.message)
        if record is not None:
            record["error"] = "the client closed the connection"
        return Response(status_code=499)  # the client closed the connection; nobody reads this

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": cfg.served_name, "object": "model", "created": 0, "owned_by": "tokedge"}]})

    async def health(request: Request) -> JSONResponse:
        if service.ready.is_set():
            stalled = service.stalled()
            if stalled is not None:
                return JSONResponse({"status": "stalled", "error": stalled}, status_code=503)
            return JSONResponse({"status": "ok"})
        if service.load_error is not None:
            return JSONResponse({"status": "error", "error": str(service.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    def logged(request: Request, exc: APIError) -> Response:
        record = request.scope.get(LOG_KEY)
        if record is not None:
            record["error"] = exc.message
        return _error(exc)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return logged(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return logged(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # the client left mid-body: nobody reads this, nothing to log

    async def internal_error(request: Request, exc: Exception) -> Response:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return logged(request, APIError(500, f"internal error: {type(exc).__name__}: {first}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.load, name="tokedge-load", daemon=True).start()
        yield
        await asyncio.to_thread(service.close)

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
                Route("/health", health), Route("/metrics", metrics)],
        exception_handlers={APIError: api_error, HTTPException: http_error, ClientDisconnect: gone,
                            Exception: internal_error},
        lifespan=lifespan,
    )
    return _Gate(app, service)


# -- process ----------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a taken port is a one-line error, not a uvicorn log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise TokedgeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock


def _protocol(cfg: ServeConfig) -> type:
    """uvicorn's h11 protocol with two bounds of its own: at most `max_connections` open client
    connections (one more is closed as soon as it is accepted, so slow clients cannot use up the
    process's file descriptors), and `request_timeout_s` for each request's headers to arrive
    (a slowloris client that drips header bytes is disconnected)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _refused = False
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.connections) >= cfg.max_connections:
                self._refused = True
                transport.abort()
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # the bytes of a (next) request's headers: they have a deadline
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in; the body has its own deadline (_read_body)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(cfg.request_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def build_server(cfg: ServeConfig, loader: Callable[[], Pipeline] | None = None) -> tuple[Any, Service]:
    import uvicorn

    service = Service(cfg, loader)
    server = uvicorn.Server(uvicorn.Config(
        create_app(service), host=cfg.host, port=cfg.port, lifespan="on", log_level="warning", access_log=False,
        http=_protocol(cfg),  # SIGTERM: stop accepting, let in-flight requests finish within the timeout
        timeout_graceful_shutdown=math.ceil(cfg.shutdown_timeout_s)))

    def stop() -> None:
        server.should_exit = True

    service.on_load_failure = stop
    return server, service


def _raise_open_files(connections: int) -> None:
    """Make room for `connections` client sockets plus the artifact's and the process's own files:
    raise the soft RLIMIT_NOFILE toward the hard one, or refuse to start (one line)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    need = connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < need:
            raise UsageError(f"--max-connections {connections} needs {need} open files, but this process may open "
                             f"{soft} (ulimit -n); lower --max-connections or raise the limit")


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM / SIGINT (after draining in-flight requests)."""
    cfg.check()
    if cfg.runtime is not None:
        cfg.runtime.check()  # an unknown backend or a missing GPU provider: one line before binding
    _raise_open_files(cfg.max_connections)
    from tokedge.artifact import read_manifest

    read_manifest(cfg.artifact)  # a path that is not an artifact: one line (exit 2) before binding
    sock = listen(cfg.host, cfg.port)
    server, service = build_server(cfg)
    port = sock.getsockname()[1]
    def ready() -> None:
        from tokedge.artifact import random_weights_notice

        print(f"tokedge serve: {cfg.served_name} ready on http://{cfg.host}:{port} (max batch {cfg.max_batch}"
              f"{', API key required' if cfg.api_key else ''})", file=sys.stderr, flush=True)
        notice = random_weights_notice(service.pipe.manifest.weights if service.pipe is not None else None)
        if notice:
            print(f"tokedge serve: note: {notice}", file=sys.stderr, flush=True)

    service.on_ready = ready
    # uvicorn re-raises the SIGTERM it caught once it has drained; a drained shutdown is a clean exit
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if service.load_error is not None:
        if isinstance(service.load_error, TokedgeError):
            raise service.load_error
        raise TokedgeError(f"loading {cfg.artifact} failed: {type(service.load_error).__name__}: "
                           f"{service.load_error}")
