"""Issue 28 item 17, against a real server with the official `openai` client: the request log line
(one per request on stderr, its numbers equal to the response's `usage`), text-only chat turns
(answers equal transformers' own `generate` on the text-only prompt: an independent reference,
for a pre-LLM and an in-LLM artifact, and alone or beside image requests), and video parts refused
by an image-only artifact with a clear OpenAI-style 400."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import openai
import pytest
import torch

from tests.serve.conftest import QUESTION, running_server, user_message
from tokedge.runtime.pipeline import Pipeline
from tokedge.serve.config import ServeConfig

LINE = re.compile(r"^tokedge serve: (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d+)(?P<rest>.*)$")


def logged(capsys, count: int, timeout: float = 10.0) -> list[dict]:
    """The request log lines on stderr once `count` have arrived: a line is written as its request
    finishes, which may be just after the client has the response (the server's thread prints it)."""
    import time

    err, deadline = "", time.monotonic() + timeout
    while True:
        err += capsys.readouterr().err
        lines = log_lines(err)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def log_lines(err: str) -> list[dict]:
    out = []
    for line in err.splitlines():
        m = LINE.match(line)
        if m:
            fields = dict(re.findall(r"(\w+)=(\"(?:[^\"\\]|\\.)*\"|\S+)", m["rest"]))
            out.append({**m.groupdict(), **fields})
    return out


@pytest.fixture(scope="module")
def server(serve_artifact):
    cfg = ServeConfig(artifact=serve_artifact, max_batch=4, batch_wait_ms=300, max_prompt_tokens=200)
    with running_server(cfg) as (base, service):
        yield base, service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=120)


def transformers_text_only(hf_tiny, text: str, max_new_tokens: int) -> tuple[str, int, int]:
    """(text, new tokens, prompt tokens) of LlavaForConditionalGeneration.generate, greedy, on a text-only turn."""
    model, processor = hf_tiny
    conv = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    enc = processor.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    return processor.tokenizer.decode(new, skip_special_tokens=True), len(new), enc.input_ids.shape[1]


def test_request_log_line_matches_usage(server, client, image_urls, capsys):
    base, service = server
    capsys.readouterr()
    model = service.cfg.served_name
    plain = client.chat.completions.create(model=model, messages=user_message(image_urls[0], QUESTION), max_tokens=7)
    streamed = list(client.chat.completions.create(model=model, messages=user_message(image_urls[1], "Colours?"),
                                                   max_tokens=5, stream=True, stream_options={"include_usage": True}))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user_message(image_urls[0], QUESTION), max_tokens=3)
    assert httpx.get(f"{base}/health").status_code == 200
    lines = logged(capsys, 3)
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("POST", "/v1/chat/completions", "200"), ("POST", "/v1/chat/completions", "200"),
        ("POST", "/v1/chat/completions", "404")]  # a successful /health probe is not logged
    for line, usage, rid, stream in ((lines[0], plain.usage, plain.id, "false"),
                                     (lines[1], streamed[-1].usage, streamed[0].id, "true")):
        assert line["id"] == rid and line["stream"] == stream
        assert int(line["prompt_tokens"]) == usage.prompt_tokens
        assert int(line["visual_tokens"]) == usage.model_extra["visual_tokens"] == 64
        assert int(line["completion_tokens"]) == usage.completion_tokens
        assert 0 < float(line["ttft_ms"]) <= float(line["total_ms"])
        assert line["client"].startswith("127.0.0.1:")
    assert lines[0]["finish"] == plain.choices[0].finish_reason
    assert "not served here" in lines[2]["error"] and "prompt_tokens" not in lines[2]


def test_no_request_log(serve_artifact, image_urls, capsys):
    cfg = ServeConfig(artifact=serve_artifact, request_log=False, warmup=False)
    with running_server(cfg) as (base, service):
        capsys.readouterr()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        client.chat.completions.create(model=service.cfg.served_name, messages=user_message(image_urls[0], "Hi"),
                                       max_tokens=2)
        assert logged(capsys, 1, timeout=1.0) == []  # given a second to arrive, none does


def test_text_only_turn_equals_transformers(server, client, hf_tiny, capsys):
    _, service = server
    assert service.text_only_refusal is None
    text, count, prompt_len = transformers_text_only(hf_tiny, "Tell me a story about a cat.", 12)
    resp = client.chat.completions.create(model=service.cfg.served_name, max_tokens=12,
                                          messages=[{"role": "user", "content": "Tell me a story about a cat."}])
    assert resp.choices[0].message.content == text
    assert resp.usage.completion_tokens == count and resp.usage.prompt_tokens == prompt_len
    assert resp.usage.model_extra["visual_tokens"] == 0
    line = logged(capsys, 1)[-1]
    assert line["status"] == "200" and line["visual_tokens"] == "0"


def test_text_only_beside_image_requests(server, client, test_images, image_urls, hf_tiny):
    """Text-only and image requests arriving together: each answer equals its own reference."""
    _, service = server
    texts = ["Hello there.", "What is two plus two?"]
    expected_text = [transformers_text_only(hf_tiny, t, 8)[0] for t in texts]
    with Pipeline.load(service.cfg.artifact) as pipe:
        expected_image = [pipe.generate(test_images[i], QUESTION, max_new_tokens=8).text for i in (0, 1)]

    def ask(i: int) -> str:
        messages = ([{"role": "user", "content": texts[i // 2]}] if i % 2 == 0
                    else user_message(image_urls[i // 2], QUESTION))
        return client.chat.completions.create(model=service.cfg.served_name, messages=messages,
                                              max_tokens=8).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers == [expected_text[0], expected_image[0], expected_text[1], expected_image[1]]


def test_text_only_on_an_in_llm_artifact(artifacts, hf_tiny):
    """fastv prunes image tokens inside the LLM: with none, its answer is the base model's."""
    text, count, _ = transformers_text_only(hf_tiny, "Name three colours.", 10)
    with running_server(ServeConfig(artifact=artifacts("fastv", 64), request_log=False)) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model=service.cfg.served_name, max_tokens=10,
                                              messages=[{"role": "user", "content": "Name three colours."}])
    assert service.text_only_refusal is None
    assert resp.choices[0].message.content == text and resp.usage.completion_tokens == count


def test_text_only_refused_where_the_artifact_cannot(server, client):
    _, service = server
    service.text_only_refusal = "RuntimeError: planted for this test"
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=service.cfg.served_name, max_tokens=3,
                                           messages=[{"role": "user", "content": "Hi"}])
    finally:
        service.text_only_refusal = None
    body = err.value.body
    assert "cannot answer a prompt without an image" in body["message"] and "planted" in body["message"]
    assert body["param"] == "messages" and body["type"] == "invalid_request_error"


def test_video_parts_are_refused_clearly(server, client, image_urls):
    """An image-only artifact (LLaVA-1.5) refuses a video_url part naming what takes video; a part of
    type "video" is told the wire format. (Video over serve on a video artifact:
    tests/export/test_onevision_video_run.py::test_serve_video_equals_transformers_generate.)"""
    _, service = server
    for part, needle, code in (
            ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "takes images only",
             "video_not_supported"),
            ({"type": "video", "video": ["data:image/png;base64,AAAA"]}, '"type": "video_url"', None)):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=service.cfg.served_name, max_tokens=3,
                                           messages=[{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])
        body = err.value.body
        assert body["code"] == code and needle in body["message"], body
        assert "\n" not in body["message"]
