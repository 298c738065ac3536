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
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokedge.errors import InputError, TokedgeError
from tokedge.layouts import layout_of
from tokedge.runtime.generate import SamplingConfig, context_limit
from tokedge.runtime.pipeline import Pipeline
from tokedge.runtime.prompt import render_messages
from tokedge.serve.config import ServeConfig
from tokedge.serve.images import fetch_image
from tokedge.serve.metrics import CONTENT_TYPE, Metrics
from tokedge.serve.protocol import APIError, ChatRequest, chunk_body, completion_body, parse_chat_request
from tokedge.serve.scheduler import Delta, Done, Event, Failed, Job, QueueFull, Scheduler

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


MAX_IMAGES_PER_PROMPT = 8  # images are fetched and decoded before the prompt length is known


def images_per_prompt(pipe: Pipeline) -> int:
    """How many images one request may carry (each becomes its own image item of the prompt)."""
    return MAX_IMAGES_PER_PROMPT


def vision_inputs(pipe: Pipeline, images: list) -> tuple[Any, list[int]]:
    """A request's images (message order) -> the vision graph's inputs (`layouts.ImageBatch`, as the
    artifact's layout prepares one prompt's images) and each image's placeholder count."""
    batch = layout_of(pipe.manifest).prepare([images], None, pipe.visual_tokens_for)
    return batch, batch.counts[0]


class Service:
    """The loaded artifact, its scheduler and metrics. Loading runs in a background thread so that
    /health can answer (503) while the artifact is verified and its sessions are created."""

    def __init__(self, cfg: ServeConfig, loader: Callable[[], Pipeline] | None = None):
        from tokedge.runtime.ort_backend import OrtOptions

        self.cfg = cfg
        self.loader = loader or (lambda: Pipeline.load(cfg.artifact, options=OrtOptions(intra_op_threads=cfg.threads)))
        self.metrics = Metrics()
        self.pipe: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.on_load_failure: Callable[[], None] = lambda: None
        self.on_ready: Callable[[], None] = lambda: None

    def load(self) -> None:
        try:
            pipe = self.loader()  # Pipeline.load checks format version and every file's sha256
            self.pipe = pipe
            if self.cfg.warmup:
                from PIL import Image

                pipe.generate(Image.new("RGB", (64, 64), (127, 127, 127)), "Hello", max_new_tokens=1)
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

    def prepare(self, req: ChatRequest, sink: Callable[[Event], None], arrived: float) -> Job:
        """Images fetched and preprocessed, messages rendered and tokenized, limits checked.
        `arrived` (perf_counter) is when the request body was in: TTFT counts from there."""
        assert self.pipe is not None
        pipe, cfg = self.pipe, self.cfg
        family, allowed = pipe.manifest.model.family, images_per_prompt(pipe)
        if not req.image_urls:
            raise APIError(400, f"this artifact ({family}) needs an image in the request: add an image_url part to "
                                "the user message; text-only prompts are not supported", param="messages")
        if len(req.image_urls) > allowed:
            raise APIError(400, f"the request has {len(req.image_urls)} images; this server takes at most {allowed} "
                                "image_url parts per request", param="messages")
        images = [fetch_image(url, cfg) for url in req.image_urls]
        try:
            pixel_values, counts = vision_inputs(pipe, images)
            rendered = render_messages(pipe.manifest.prompt, req.messages, pipe.manifest.prompt.special_tokens)
            enc = pipe.encoder.encode_rendered([rendered], [counts])
        except InputError as exc:
            raise APIError(400, str(exc), param="messages") from None
        prompt_tokens = int(enc.input_ids.shape[1])
        if prompt_tokens > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens (image included); this server accepts at most "
                                f"{cfg.max_prompt_tokens} (--max-prompt-tokens); shorten the messages",
                           param="messages")
        limit = context_limit(pipe.graphs)
        if prompt_tokens + req.max_tokens > limit:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens, image included) + max_tokens ({req.max_tokens}) "
                                f"exceeds the model's context of {limit} tokens; lower max_tokens",
                           param="max_tokens")
        sampling = SamplingConfig(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed)
        return Job(pixel_values=pixel_values, input_ids=enc.input_ids[0], sampling=sampling, stop=req.stop, sink=sink,
                   created=arrived)


# -- HTTP -------------------------------------------------------------------------------------------


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class _Gate:
    """ASGI middleware: checks the API key and counts every answered request by path and status."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service
        key = service.cfg.api_key
        self.expected = key.encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in ROUTES else "other"
        metrics = self.service.metrics

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                code = str(message["status"])
                metrics.inc("tokedge_requests", path=path, code=code)
                if message["status"] >= 400:
                    metrics.inc("tokedge_request_errors", path=path, code=code)
            await send(message)

        if self.expected is not None and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                       else "incorrect API key in the Authorization header")
                await _error(APIError(401, msg, code="invalid_api_key"))(scope, receive, counted)
                return
        await self.app(scope, receive, counted)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; this server accepts at most {limit} "
                            "(images count after base64; see --max-image-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes, this server's limit "
                                "(images count after base64; see --max-image-bytes)")
        chunks.append(chunk)
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
                    await emit(json.dumps(chunk_body(self.req, {}, event.finish_reason)))
                    if self.req.include_usage:
                        await emit(json.dumps(chunk_body(self.req, None, usage=event.usage())))
                else:
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
        body = await _read_body(request, cfg.max_body_bytes)
        arrived = time.perf_counter()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None
        req = parse_chat_request(data, served_name=cfg.served_name, max_tokens_limit=cfg.max_tokens_limit,
                                 default_max_tokens=cfg.default_max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = await run_in_threadpool(service.prepare, req, sink, arrived)
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
                    return JSONResponse(completion_body(req, event.text, event.finish_reason, event.usage()))
                if isinstance(event, Failed):
                    raise APIError(500, event.message)
        return Response(status_code=499)  # the client closed the connection; nobody reads this

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": cfg.served_name, "object": "model", "created": 0, "owned_by": "tokedge"}]})

    async def health(request: Request) -> JSONResponse:
        if service.ready.is_set():
            return JSONResponse({"status": "ok"})
        if service.load_error is not None:
            return JSONResponse({"status": "error", "error": str(service.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def internal_error(request: Request, exc: Exception) -> Response:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {first}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.load, name="tokedge-load", daemon=True).start()
        yield
        await asyncio.to_thread(service.close)

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
                Route("/health", health), Route("/metrics", metrics)],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
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


def build_server(cfg: ServeConfig, loader: Callable[[], Pipeline] | None = None) -> tuple[Any, Service]:
    import uvicorn

    service = Service(cfg, loader)
    server = uvicorn.Server(uvicorn.Config(
        create_app(service), host=cfg.host, port=cfg.port, lifespan="on", log_level="warning", access_log=False,
        timeout_graceful_shutdown=None))  # SIGTERM: stop accepting, let every in-flight request finish

    def stop() -> None:
        server.should_exit = True

    service.on_load_failure = stop
    return server, service


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM / SIGINT (after draining in-flight requests)."""
    from tokedge.errors import require

    cfg.check()
    require("uvicorn", "serve")
    require("starlette", "serve")
    sock = listen(cfg.host, cfg.port)
    server, service = build_server(cfg)
    port = sock.getsockname()[1]
    service.on_ready = lambda: print(
        f"tokedge serve: {cfg.served_name} ready on http://{cfg.host}:{port} (max batch {cfg.max_batch}"
        f"{', API key required' if cfg.api_key else ''})", file=sys.stderr, flush=True)
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
