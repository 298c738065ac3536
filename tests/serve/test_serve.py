"""`tokedge serve` end to end: a real uvicorn server on 127.0.0.1 talked to with the official
`openai` client (and raw httpx where the client would hide the wire), answers compared with
`tokedge run` / `Pipeline.generate` (a separate decode loop) and with transformers' tokenizer."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.export.test_parity import chat
from tests.serve.conftest import QUESTION, data_url, running_server, user_message, wait_ready
from tokedge.cli import main
from tokedge.runtime.pipeline import Pipeline
from tokedge.serve.config import ServeConfig

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(serve_artifact):
    cfg = ServeConfig(artifact=serve_artifact, api_key=KEY, max_batch=4, max_image_bytes=600_000,
                      max_image_pixels=2_000_000, batch_wait_ms=50, max_prompt_tokens=120, max_tokens_limit=2040)
    with running_server(cfg) as (base, service):
        yield base, service


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server):
    return server[1].cfg.served_name


@pytest.fixture(scope="module")
def pipe(serve_artifact):
    with Pipeline.load(serve_artifact) as p:
        yield p


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def post(base: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Content-Type"] = "application/json"
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{base}/v1/chat/completions", content=content, headers=headers, timeout=60)


def assert_openai_error(resp: httpx.Response, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert fragment in err["message"] and isinstance(err["type"], str) and "\n" not in err["message"]


# -- answers ---------------------------------------------------------------------------------------


def test_greedy_answer_equals_tokedge_run(client, model, serve_artifact, image_files, image_urls, hf_tiny, capsys):
    rc = main(["run", str(serve_artifact), "--image", str(image_files[0]), "--prompt", QUESTION,
               "--max-new-tokens", "24", "--json"])
    assert rc == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    resp = client.chat.completions.create(model=model, messages=user_message(image_urls[0], QUESTION), max_tokens=24)
    assert resp.choices[0].message.content == expected["text"]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == ("length" if len(expected["token_ids"]) == 24 else "stop")
    # usage against transformers' own chat template and tokenizer (placeholder expanded to 64)
    _, processor = hf_tiny
    prompt_ids = processor.tokenizer(chat(processor, QUESTION).replace("<image>", "<image>" * 64)).input_ids
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(expected["token_ids"])
    assert resp.usage.total_tokens == len(prompt_ids) + len(expected["token_ids"])
    assert resp.usage.model_extra["visual_tokens"] == expected["visual_tokens"] == 64


def test_stream_chunks_join_to_the_non_streamed_text(client, model, image_urls):
    messages = user_message(image_urls[1], "Describe the picture.")
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_eight_concurrent_clients_get_their_single_answers(server, client, model, pipe, test_images, image_urls):
    base, _ = server
    prompts = ["Hi?", QUESTION, "Describe the picture in detail, with colours and objects.", "What colour is it?"]
    cases = [(i % 3, prompts[i % 4], {"temperature": 1.2, "top_p": 0.9, "seed": 100 + i} if i in (2, 5) else {})
             for i in range(8)]
    expected = [pipe.generate(test_images[img], prompt, max_new_tokens=16, **kw).text for img, prompt, kw in cases]
    before = scrape(base)

    def ask(case):
        img, prompt, kw = case
        return client.chat.completions.create(model=model, messages=user_message(image_urls[img], prompt),
                                              max_tokens=16, **kw).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))
    assert answers == expected
    after = scrape(base)
    batches = delta(before, after, "tokedge_batch_size_count")
    assert delta(before, after, "tokedge_batch_size_sum") == 8
    assert batches < 8  # some requests really shared a batch


def test_sampling_parameters_and_seed(client, model, pipe, test_images, image_urls):
    messages = user_message(image_urls[0], QUESTION)
    kw = {"temperature": 1.5, "top_p": 0.95}
    a = client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=11, **kw)
    b = client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=11, **kw)
    others = {client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=s,
                                             **kw).choices[0].message.content for s in (12, 13, 14)}
    alone = pipe.generate(test_images[0], QUESTION, max_new_tokens=12, seed=11, **kw).text
    assert a.choices[0].message.content == b.choices[0].message.content == alone
    assert others - {alone}  # other seeds sample something else


def test_stop_strings_and_max_tokens(client, model, pipe, test_images, image_urls):
    full = pipe.generate(test_images[2], QUESTION, max_new_tokens=30).text
    assert len(full) > 12
    stop = full[6:9]
    cut = full.find(stop)
    messages = user_message(image_urls[2], QUESTION)
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=30, stop=[stop, "\u2603never"])
    assert resp.choices[0].message.content == full[:cut]
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=30, stop=stop, stream=True) if c.choices)
    assert streamed == full[:cut]
    short = client.chat.completions.create(model=model, messages=messages, max_tokens=5)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == pipe.generate(test_images[2], QUESTION, max_new_tokens=5).text


def test_models_lists_the_artifact(client, model, serve_artifact):
    assert [m.id for m in client.models.list().data] == [model] == [serve_artifact.name]


# -- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"messages": []}, 400, "'model' is required"),
    ({"model": "MODEL", "messages": []}, 400, "'messages' must be a non-empty list"),
    ({"model": "MODEL", "messages": [{"role": "robot", "content": "hi"}]}, 400, "'role' one of"),
    ({"model": "MODEL", "messages": "USER_IMG", "temperature": 3}, 400, "'temperature' must be in [0, 2]"),
    ({"model": "MODEL", "messages": "USER_IMG", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ({"model": "MODEL", "messages": "USER_IMG", "max_tokens": 0}, 400, "'max_tokens' must be in [1, 2040]"),
    ({"model": "MODEL", "messages": "USER_IMG", "max_tokens": 2000}, 400, "exceeds the model's context of 2048"),
    ({"model": "MODEL", "messages": "LONG_TEXT"}, 400, "at most 120 (--max-prompt-tokens)"),
    ({"model": "MODEL", "messages": "USER_IMG", "max_tokens": "5"}, 400, "'max_tokens' must be an integer"),
    ({"model": "MODEL", "messages": "USER_IMG", "stop": [""]}, 400, "'stop' must be"),
    ({"model": "MODEL", "messages": "USER_IMG", "n": 2}, 400, "'n' must be 1"),
    ({"model": "other", "messages": "USER_IMG"}, 404, "model 'other' is not served here"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}, 400, "takes images only"),
    ({"model": "MODEL", "messages": "NINE_IMAGES"}, 400, "at most 8 image_url parts"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "not valid base64"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, "not hold an image"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "got type 'audio'"),
])
def test_malformed_request_gets_400_and_the_next_one_succeeds(server, client, model, image_urls, body, status,
                                                               fragment):
    base, _ = server
    if isinstance(body, dict):
        body = {**body, "model": model} if body.get("model") == "MODEL" else body
        if body.get("messages") == "USER_IMG":
            body["messages"] = user_message(image_urls[0], "hi")
        elif body.get("messages") == "LONG_TEXT":
            body["messages"] = user_message(image_urls[0], "tell me more " * 40)
        elif body.get("messages") == "NINE_IMAGES":
            small = data_url(Image.new("RGB", (8, 8), (1, 2, 3)))  # nine, well within the body limit
            nine = user_message(small, "hi")
            nine[0]["content"][1:1] = [{"type": "image_url", "image_url": {"url": small}}] * 8
            body["messages"] = nine
    assert_openai_error(post(base, body), status, fragment)
    ok = client.chat.completions.create(model=model, messages=user_message(image_urls[0], "hi"), max_tokens=3)
    assert ok.usage.completion_tokens >= 1 or ok.choices[0].finish_reason == "stop"


def test_openai_client_raises_bad_request(client, model, image_urls):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=user_message(image_urls[0], "hi"), temperature=5)


def test_oversized_image_gets_413(server, model, image_urls):
    base, _ = server
    import numpy as np

    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 600, 3), dtype=np.uint8))  # ~1.1 MB
    huge = Image.new("RGB", (2000, 1500), (10, 200, 30))  # 3 MP, a few KB as PNG
    for img, fragment in ((noisy, "600000 bytes"), (huge, "at most 2000000 pixels")):
        resp = post(base, {"model": model, "messages": user_message(data_url(img), "hi")})
        assert_openai_error(resp, 413, fragment)
    limit = server[1].cfg.max_body_bytes
    assert_openai_error(post(base, b"x" * (limit + 1)), 413, f"at most {limit}")  # by Content-Length
    chunked = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json"},
                         content=(b"x" * 65536 for _ in range(limit // 65536 + 2)))  # no Content-Length
    assert_openai_error(chunked, 413, f"larger than {limit} bytes")
    assert post(base, {"model": model, "messages": user_message(image_urls[0], "hi"), "max_tokens": 2}).status_code == 200


def test_api_key_is_required(server, model, image_urls):
    base, _ = server
    body = {"model": model, "messages": user_message(image_urls[0], "hi"), "max_tokens": 2}
    assert_openai_error(post(base, body, key=None), 401, "missing API key")
    assert_openai_error(post(base, body, key="wrong"), 401, "incorrect API key")
    assert_openai_error(post(base, body, key=f"{KEY}x"), 401, "incorrect API key")
    basic = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Basic {KEY}"})
    assert_openai_error(basic, 401, "incorrect API key")
    lower = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/metrics").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200  # probes need no key
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model, messages=user_message(image_urls[0], "hi"))
    assert post(base, body).status_code == 200


def test_image_url_must_be_data_unless_allowed(server, model, image_files):
    base, _ = server
    for url in (str(image_files[0]), f"file://{image_files[0]}", "http://127.0.0.1:9/x.png"):
        resp = post(base, {"model": model, "messages": user_message(url, "hi")})
        assert_openai_error(resp, 400, "must be a data: URL")


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_parse_and_count_the_requests(server, client, model, image_urls):
    base, _ = server
    before = scrape(base)
    usages = [client.chat.completions.create(model=model, messages=user_message(image_urls[i], QUESTION),
                                             max_tokens=6 + i).usage for i in range(2)]
    assert post(base, {"model": model, "messages": []}).status_code == 400
    assert post(base, {"model": model, "messages": []}, key=None).status_code == 401
    after = scrape(base)
    chat_path = "/v1/chat/completions"
    assert delta(before, after, "tokedge_requests_total", path=chat_path, code="200") == 2
    assert delta(before, after, "tokedge_requests_total", path=chat_path, code="400") == 1
    assert delta(before, after, "tokedge_requests_total", path=chat_path, code="401") == 1
    assert delta(before, after, "tokedge_request_errors_total", path=chat_path, code="400") == 1
    assert delta(before, after, "tokedge_requests_total", path="/metrics", code="200") == 1  # the first scrape
    finished = sum(delta(before, after, "tokedge_completions_total", reason=r) for r in ("stop", "length"))
    assert finished == 2
    assert delta(before, after, "tokedge_completion_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta(before, after, "tokedge_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta(before, after, "tokedge_ttft_seconds_count") == 2
    assert delta(before, after, "tokedge_visual_tokens_count") == 2
    assert delta(before, after, "tokedge_visual_tokens_sum") == 128
    assert after[("tokedge_queue_depth", ())] == 0 and after[("tokedge_ready", ())] == 1


# -- cancellation and the queue --------------------------------------------------------------------


def _wait_metric(base: str, name: str, labels: dict, at_least: float | None = None, equal: float | None = None,
                 timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = scrape(base)
        value = now.get((name, tuple(sorted(labels.items()))), 0.0)
        if (at_least is not None and value >= at_least) or (equal is not None and value == equal):
            return now
        time.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {at_least if at_least is not None else equal}")


def _open_stream(base: str, model: str, image_url: str, max_tokens: int, key: str | None = KEY):
    """Start a streamed request and read until the first content chunk: the request is running."""
    http = httpx.Client(timeout=120)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    cm = http.stream("POST", f"{base}/v1/chat/completions", headers=headers, json={
        "model": model, "messages": user_message(image_url, QUESTION), "max_tokens": max_tokens, "stream": True})
    resp = cm.__enter__()
    lines = resp.iter_lines()
    seen = 0
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            seen += 1
            if seen == 2:
                break
    return http, cm, lines


@pytest.fixture(scope="module")
def slow_server(slow_artifact):
    with running_server(ServeConfig(artifact=slow_artifact, api_key=KEY, max_tokens_limit=1500)) as (base, service):
        yield base, service


def test_client_disconnect_cancels_its_work(slow_server, image_urls):
    base, service = slow_server
    model = service.cfg.served_name
    before = scrape(base)
    cancelled = before.get(("tokedge_completions_total", (("reason", "cancelled"),)), 0)
    http, cm, _ = _open_stream(base, model, image_urls[0], max_tokens=1500)
    cm.__exit__(None, None, None)
    http.close()  # the client goes away mid-answer
    _wait_metric(base, "tokedge_completions_total", {"reason": "cancelled"}, cancelled + 1)
    after = _wait_metric(base, "tokedge_running_requests", {}, equal=0)
    assert delta(before, after, "tokedge_completion_tokens_total") < 1000  # stopped well before max_tokens
    # not streamed: the client times out and closes the connection
    quick = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        quick.chat.completions.create(model=model, messages=user_message(image_urls[1], QUESTION), max_tokens=1500)
    _wait_metric(base, "tokedge_completions_total", {"reason": "cancelled"}, cancelled + 2)
    after = scrape(base)
    assert delta(before, after, "tokedge_completion_tokens_total") < 2000
    assert delta(before, after, "tokedge_completions_total", reason="length") == 0
    ok = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=model, messages=user_message(image_urls[0], "hi"), max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_full_queue_gets_429(slow_artifact, image_urls):
    cfg = ServeConfig(artifact=slow_artifact, max_batch=1, max_queue=1, batch_wait_ms=0, max_tokens_limit=1500)
    with running_server(cfg) as (base, service):
        model = service.cfg.served_name
        http, cm, _ = _open_stream(base, model, image_urls[0], max_tokens=1500, key=None)  # running
        quiet = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(quiet.chat.completions.create, model=model,
                                 messages=user_message(image_urls[1], "hi"), max_tokens=4)
            _wait_metric(base, "tokedge_queue_depth", {}, 1)
            with pytest.raises(openai.RateLimitError) as info:
                quiet.chat.completions.create(model=model, messages=user_message(image_urls[2], "hi"), max_tokens=4)
            assert info.value.status_code == 429 and "--max-queue 1" in info.value.message
            cm.__exit__(None, None, None)
            http.close()  # cancel the running one: the queued one runs next
            assert queued.result(timeout=120).usage.completion_tokens == 4
        counts = scrape(base)
        assert counts[("tokedge_requests_total", (("code", "429"), ("path", "/v1/chat/completions")))] == 1


# -- readiness and image sources -------------------------------------------------------------------


def test_health_is_ready_only_after_the_artifact_is_loaded(serve_artifact, image_urls, test_images):
    gate = threading.Event()

    def slow_loader():  # the real loader (hash check + sessions), started only when the test says so
        gate.wait(60)
        return Pipeline.load(serve_artifact)

    with running_server(ServeConfig(artifact=serve_artifact), loader=slow_loader, wait=False) as (base, service):
        wait_for_socket = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < wait_for_socket
                time.sleep(0.05)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        body = {"model": service.cfg.served_name, "messages": user_message(image_urls[0], "hi")}
        assert_openai_error(post(base, body, key=None), 503, "still loading")
        metrics = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                   for s in f.samples}
        assert metrics["tokedge_ready"] == 0
        gate.set()
        wait_ready(base)
        resp = post(base, {**body, "max_tokens": 4}, key=None)
        assert resp.status_code == 200
        with Pipeline.load(serve_artifact) as pipe:
            assert resp.json()["choices"][0]["message"]["content"] == pipe.generate(test_images[0], "hi",
                                                                                    max_new_tokens=4).text


def test_local_and_remote_images_when_allowed(serve_artifact, image_files, image_urls, tmp_path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(image_files[0].parent), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    outside = tmp_path / "outside.png"
    outside.write_bytes(image_files[0].read_bytes())
    cfg = ServeConfig(artifact=serve_artifact, allow_local_images=image_files[0].parent, allow_remote_images=True)
    try:
        with running_server(cfg) as (base, service):
            model = service.cfg.served_name

            def answer(url):
                resp = post(base, {"model": model, "messages": user_message(url, "hi"), "max_tokens": 6}, key=None)
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]["message"]["content"]

            reference = answer(image_urls[0])
            assert answer(str(image_files[0])) == reference
            assert answer(f"file://{image_files[0]}") == reference
            assert answer(image_files[0].name) == reference  # relative to the allowed directory
            assert answer(f"http://127.0.0.1:{httpd.server_address[1]}/{image_files[0].name}") == reference
            body = {"model": model, "messages": user_message(str(outside), "hi")}
            assert_openai_error(post(base, body, key=None), 400, "outside the allowed directory")
            body = {"model": model, "messages": user_message("../" + outside.name, "hi")}
            assert_openai_error(post(base, body, key=None), 400, "outside the allowed directory")
    finally:
        httpd.shutdown()


def test_conversation_equals_transformers_generate(artifacts, hf_tiny, test_images, image_urls):
    """A system prompt and earlier turns, rendered by the artifact's template, answered greedily:
    the same tokens as LlavaForConditionalGeneration.generate on transformers' own rendering."""
    import torch

    model, processor = hf_tiny
    turns = [("system", "You answer briefly."), ("user", "What is this?"), ("assistant", "A cat."),
             ("user", "What colour is it?")]
    hf_conv = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in turns]
    hf_conv[1]["content"].insert(0, {"type": "image"})
    inputs = processor(images=test_images[1], text=processor.apply_chat_template(hf_conv, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                             pad_token_id=model.config.text_config.pad_token_id)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    messages = [{"role": role, "content": text} for role, text in turns]  # plain strings, as clients send them
    messages[1]["content"] = [{"type": "image_url", "image_url": {"url": image_urls[1]}},
                              {"type": "text", "text": "What is this?"}]
    with running_server(ServeConfig(artifact=artifacts("none", 576))) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model=service.cfg.served_name, messages=messages, max_tokens=12)
    assert resp.choices[0].message.content == expected
    assert resp.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert resp.usage.model_extra["visual_tokens"] == 576


def test_two_images_in_one_message_equal_transformers_generate(artifacts, hf_tiny, test_images, image_urls):
    """Two image_url parts in one user message: one prompt with both images, as
    LlavaForConditionalGeneration.generate answers it given both; usage counts both images."""
    import torch

    model, processor = hf_tiny
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=test_images[:2], text=processor.apply_chat_template(conv, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False,
                             pad_token_id=model.config.text_config.pad_token_id)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    messages = user_message(image_urls[0], QUESTION)
    messages[0]["content"].insert(1, {"type": "image_url", "image_url": {"url": image_urls[1]}})
    with running_server(ServeConfig(artifact=artifacts("none", 576), max_batch=2)) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model=service.cfg.served_name, messages=messages, max_tokens=10)
    assert resp.choices[0].message.content == expected
    assert resp.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert resp.usage.model_extra["visual_tokens"] == 2 * 576
