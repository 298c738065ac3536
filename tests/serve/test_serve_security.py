"""Security round 3 (issue 22), the server's items: a real `tokedge serve` app on 127.0.0.1 (uvicorn,
in a thread of this process) talked to over real sockets by httpx or raw sockets, each case
bounded in time and request count. The server's log must show no traceback for any of it."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import QUESTION, data_url, running_server, user_message
from tokedge.layouts import layout_of
from tokedge.runtime.generate import SamplingConfig
from tokedge.runtime.pipeline import Pipeline
from tokedge.serve.config import ServeConfig
from tokedge.serve.metrics import Metrics
from tokedge.serve.scheduler import Done, Failed, Job, Scheduler, TextTracker

JSON = {"Content-Type": "application/json"}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOGGERS = ("uvicorn", "uvicorn.error", "asyncio")


@pytest.fixture(scope="module")
def server_log():
    """Everything uvicorn logs (its 'Exception in ASGI application' tracebacks included). uvicorn's
    logging set-up replaces the handlers of its loggers whenever a server is built, so
    `no_tracebacks` attaches this one again before each test."""
    handler = _Records()
    yield handler
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, test_images) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    test_images[0].save(root / "a.png")
    return root


@pytest.fixture(scope="module")
def server(serve_artifact, image_dir, server_log):
    """The default shape (loopback, no key), with small limits so that each case stays cheap."""
    cfg = ServeConfig(artifact=serve_artifact, max_batch=4, batch_wait_ms=30, max_image_pixels=2_000_000,
                      max_request_pixels=3_000_000, request_timeout_s=1.0, allow_local_images=image_dir)
    with running_server(cfg) as (base, service):
        yield base, service


def post(base: str, body, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{base}/v1/chat/completions", content=content, headers={**JSON, **(headers or {})},
                      timeout=timeout)


def request(model: str, url: str, text: str = "hi", **fields) -> dict:
    return {"model": model, "messages": user_message(url, text), "max_tokens": 3, **fields}


def assert_error(resp: httpx.Response, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert fragment in err["message"], err["message"]
    assert "\n" not in err["message"] and isinstance(err["type"], str)


@pytest.fixture(autouse=True)
def no_tracebacks(server_log):
    for name in LOGGERS:
        if server_log not in logging.getLogger(name).handlers:
            logging.getLogger(name).addHandler(server_log)
    before = len(server_log.records)
    yield
    bad = [r for r in server_log.records[before:] if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# -- 1: stop strings --------------------------------------------------------------------------------


def test_long_stop_strings_are_refused_at_once(server, image_urls):
    base, service = server
    model = service.cfg.served_name
    t0 = time.monotonic()
    assert_error(post(base, request(model, image_urls[0], stop=["q" * 1_000_000], max_tokens=4), timeout=10), 400,
                 "at most 256 per stop string")
    assert time.monotonic() - t0 < 5
    assert_error(post(base, request(model, image_urls[0], stop=["a", "b", "c", "d", "e"])), 400, "up to 4")
    assert post(base, request(model, image_urls[0], stop=["q" * 256, "\u2603" * 256])).status_code == 200


def test_stop_hold_back_is_linear_and_exact():
    """The held-back tail equals the brute-force definition (the longest proper prefix of a stop
    string that ends the text) and a 200,000-character stop string costs linear time per step."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        stop = "".join(rng.choice(list("ab"), rng.integers(1, 7)))
        pieces = list("".join(rng.choice(list("abc"), rng.integers(1, 14))))
        tracker = TextTracker(lambda ids, p=pieces: "".join(p[i] for i in ids), (stop,))
        sent = ""
        for n in range(1, len(pieces) + 1):
            text = "".join(pieces[:n])
            delta, hit = tracker.update(list(range(n)))
            sent += delta
            if hit:
                break
            hold = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            assert sent == text[: len(text) - hold]
    long_stop = "q" * 200_000
    tracker = TextTracker(lambda ids: "x" + "q" * len(ids), (long_stop,))
    t0 = time.monotonic()
    for n in range(1, 201):
        tracker.update(list(range(n)))
    assert time.monotonic() - t0 < 5  # the quadratic scan took minutes


# -- 2: sampling parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("field,fragment", [
    ('"temperature": NaN', "NaN, which is not JSON"),
    ('"top_p": Infinity', "Infinity, which is not JSON"),
    ('"temperature": -Infinity', "-Infinity, which is not JSON"),
    ('"seed": -1', "'seed' must be an integer from 0 to 9223372036854775807"),
    ('"seed": 9223372036854775808', "'seed' must be an integer from 0"),
    ('"temperature": 1e400', "'temperature' must be a finite number"),
])
def test_bad_sampling_values_get_400(server, image_urls, field, fragment):
    base, service = server
    body = json.dumps(request(service.cfg.served_name, image_urls[0]))[:-1] + ", " + field + "}"
    assert_error(post(base, body), 400, fragment)


def test_bad_requests_do_not_fail_the_honest_ones_beside_them(server, image_urls):
    base, service = server
    model = service.cfg.served_name
    good = request(model, image_urls[1], QUESTION, max_tokens=4)
    bad = [json.dumps(request(model, image_urls[0]))[:-1] + ", " + f + "}"
           for f in ('"seed": -1', '"temperature": NaN', '"top_p": NaN')]
    stop = threading.Event()

    def attack(body: str) -> list[int]:
        codes = []
        while not stop.is_set() and len(codes) < 40:
            codes.append(post(base, body).status_code)
        return codes

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        attackers = [pool.submit(attack, b) for b in bad]
        honest = [post(base, good) for _ in range(5)]
        stop.set()
        codes = [c for a in attackers for c in a.result(timeout=60)]
    assert [r.status_code for r in honest] == [200] * 5, [r.text for r in honest]
    assert set(codes) == {400}


def test_a_row_that_fails_inside_a_batch_fails_alone(serve_artifact, test_images):
    """A job the protocol would refuse (seed -1), handed to the scheduler directly in one batch with
    an honest one: only its own row fails; the other gets exactly its single-run answer."""
    with Pipeline.load(serve_artifact) as pipe:
        expected = pipe.generate(test_images[1], QUESTION, max_new_tokens=6).text
        events: dict[str, list] = {"bad": [], "good": []}
        jobs = []
        for name, prompt, cfg in (("bad", "Hi?", SamplingConfig(max_new_tokens=6, temperature=1.0, seed=-1)),
                                  ("good", QUESTION, SamplingConfig(max_new_tokens=6))):
            enc = pipe.encoder.encode([prompt], pipe.visual_tokens_for(None))
            images = layout_of(pipe.manifest).prepare([[test_images[1]]], None, pipe.visual_tokens_for)
            jobs.append(Job(pixel_values=images, input_ids=enc.input_ids[0], sampling=cfg, stop=(),
                            sink=events[name].append))
        metrics = Metrics()
        scheduler = Scheduler(pipe.graphs, pipe.encoder.decode, metrics, max_batch=2, max_queue=4, batch_wait_s=0,
                              context_limit=2048, pad_token_id=pipe.manifest.model.pad_token_id or 0)
        for job in jobs:
            scheduler.submit(job)  # both queued before the worker starts: one batch
        scheduler.start()
        scheduler.close(timeout=60)
    assert len(events["bad"]) == 1 and isinstance(events["bad"][0], Failed)
    assert "seed" in events["bad"][0].message
    done = events["good"][-1]
    assert isinstance(done, Done) and done.text == expected


# -- 18: a tiny temperature -------------------------------------------------------------------------


def test_tiny_temperature_samples_the_greedy_token(server, image_urls):
    base, service = server
    model = service.cfg.served_name
    greedy = post(base, request(model, image_urls[2], QUESTION, max_tokens=8))
    tiny = post(base, request(model, image_urls[2], QUESTION, max_tokens=8, temperature=1e-320, seed=5))
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


# -- 12: web pages in the user's browser ------------------------------------------------------------


def test_loopback_server_refuses_foreign_hosts_origins_and_non_json(server, image_urls):
    base, service = server
    model = service.cfg.served_name
    port = base.rsplit(":", 1)[1]
    body = request(model, image_urls[0])
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.5", "127.0.0.1.nip.io"):
        assert_error(post(base, body, {"Host": host}), 403, "is not this server's")
        assert httpx.get(f"{base}/v1/models", headers={"Host": host}).status_code == 403  # DNS rebinding reads nothing
    for origin in ("http://evil.example", "https://attacker.test:443", "null"):
        assert_error(post(base, body, {"Origin": origin}), 403, "cross-origin request")
    # a form or fetch() without a preflight can only send text/plain (or form types)
    resp = httpx.post(f"{base}/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert_error(resp, 415, "Content-Type: application/json")
    assert_error(httpx.post(f"{base}/v1/chat/completions", content=json.dumps(body)), 415, "application/json")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert post(base, body, {"Host": host, "Origin": f"http://{host}"}).status_code == 200


# -- 13: client input that used to give 500 -----------------------------------------------------------


def test_hostile_json_and_text_get_400(server, image_urls, image_dir, tmp_path):
    base, service = server
    model = service.cfg.served_name
    assert_error(post(base, b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply")
    assert_error(post(base, b'{"model": ' + b"[" * 40 + b"]" * 40 + b"}"), 400, "nested too deeply")
    surrogate = json.dumps(request(model, image_urls[0], "hi \ud800 there"))  # json escapes it as \ud800
    assert_error(post(base, surrogate), 400, "lone surrogate")
    assert_error(post(base, json.dumps({"model": "x\udfff", "messages": []})), 400, "lone surrogate")
    assert_error(post(base, b'{"model": "\xff"}'), 400, "not valid JSON")
    loop = image_dir / "loop.png"
    os.symlink(loop, loop)
    try:
        for url, fragment in ((str(image_dir / "a\x00.png"), "without NUL"), ("x" * 100_000, "at most 4096"),
                              ("y" * 300 + ".png", "cannot be opened"), (str(loop), "symbolic link"),
                              ("loop.png/x.png", "symbolic link")):
            assert_error(post(base, request(model, url)), 400, fragment)
    finally:
        loop.unlink()
    assert post(base, request(model, "a.png")).status_code == 200


# -- 4: local images --------------------------------------------------------------------------------


def test_local_images_are_opened_without_following_links(server, image_dir, tmp_path, test_images):
    base, service = server
    model = service.cfg.served_name
    outside = tmp_path / "outside"
    outside.mkdir()
    test_images[1].save(outside / "b.png")
    (image_dir / "inner").mkdir(exist_ok=True)
    links = {"to-inside.png": image_dir / "a.png", "to-outside.png": outside / "b.png", "dir-out": outside}
    for name, target in links.items():
        (image_dir / name).unlink(missing_ok=True)
        os.symlink(target, image_dir / name)
    for url in ("to-inside.png", "to-outside.png", "dir-out/b.png", str(image_dir / "dir-out" / "b.png"),
                f"file://{image_dir}/to-outside.png"):
        assert_error(post(base, request(model, url)), 400, "symbolic link")
    assert_error(post(base, request(model, str(outside / "b.png"))), 400, "outside the allowed directory")
    assert_error(post(base, request(model, "inner")), 400, "not a regular file")
    assert post(base, request(model, f"file://{image_dir}/a.png")).status_code == 200


SWAPPER = """
import ctypes, os, sys, time
d, target, end = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
name, other = os.path.join(d, "race.png"), os.path.join(d, ".race-link")
with open(name, "wb") as f:
    f.write(b"inside, not an image")
os.symlink(target, other)
libc = ctypes.CDLL(None, use_errno=True)
exchange = lambda: libc.renameat2(-100, name.encode(), -100, other.encode(), 2)  # RENAME_EXCHANGE
if exchange() != 0:  # no renameat2 here: swap by renaming through a third name
    def exchange():
        os.rename(name, name + ".t"); os.rename(other, name); os.rename(name + ".t", other)
while time.monotonic() < end:
    exchange()
"""


def test_a_local_image_swapped_for_a_link_is_never_read_outside(server, image_dir, tmp_path):
    """A local writer swaps DIR/race.png between a file and a link to a file outside DIR while
    requests name it. The outside file is an image over the pixel limit, so reading it answers 413;
    the inside file is not an image (400). No request may ever answer 413."""
    base, service = server
    model = service.cfg.served_name
    secret = tmp_path / "secret.png"
    Image.new("L", (2000, 1001)).save(secret)  # 2,002,000 pixels > --max-image-pixels
    assert_error(post(base, {**request(model, "a.png"), "messages": user_message(data_url(Image.open(secret)), "hi")}),
                 413, "pixels")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(image_dir), str(secret), "6"])
    body = json.dumps(request(model, "race.png"))
    end = time.monotonic() + 5

    def client() -> list[int]:  # several at once: their checks and reads interleave in the server
        codes = []
        with httpx.Client(headers=JSON, timeout=30) as http:
            while time.monotonic() < end and len(codes) < 500:
                codes.append(http.post(f"{base}/v1/chat/completions", content=body).status_code)
        return codes

    try:
        time.sleep(0.2)  # the swapper has made both names
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = [c for f in [pool.submit(client) for _ in range(4)] for c in f.result(timeout=60)]
    finally:
        swapper.wait(30)
        for leftover in ("race.png", ".race-link"):
            (image_dir / leftover).unlink(missing_ok=True)
    assert 413 not in codes, f"{codes.count(413)} of {len(codes)} requests read the file outside DIR"
    assert len(codes) > 50 and set(codes) <= {400}


# -- 7: images per request --------------------------------------------------------------------------


def test_request_pixel_budget_is_checked_before_decoding(server, image_urls):
    base, service = server
    model = service.cfg.served_name
    big = data_url(Image.new("RGB", (1600, 1000), (9, 9, 9)))  # 1.6 Mpx each, within the 2 Mpx per image
    two = request(model, big)
    two["messages"][0]["content"].insert(1, {"type": "image_url", "image_url": {"url": big}})
    assert_error(post(base, two), 413, "at most 3000000 per request (--max-request-pixels)")
    assert post(base, request(model, big)).status_code == 200
    assert service.stages[1].slots == 2  # decoding runs on its own bounded stage


# -- 15: image formats ------------------------------------------------------------------------------


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_only_common_image_formats_are_decoded(server, image_dir):
    import base64

    base, service = server
    model = service.cfg.served_name
    for payload in (EPS, b"\xc5\xd0\xd3\xc6" + b"\x00" * 28 + EPS):  # plain and DOS-binary EPS
        url = "data:image/eps;base64," + base64.b64encode(payload).decode()
        assert_error(post(base, request(model, url)), 400, "accepted format (PNG, JPEG, WEBP, GIF, BMP, TIFF)")
    (image_dir / "x.eps").write_bytes(EPS)
    assert_error(post(base, request(model, "x.eps")), 400, "accepted format")
    for fmt in ("JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert post(base, request(model, data_url(Image.new("RGB", (40, 30), (200, 10, 10)), fmt))).status_code == 200


# -- 6: connections, headers and bodies -------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_headers_and_bodies_are_cut_off(server, image_urls):
    base, service = server
    port = int(base.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")  # never finishes
    t0 = time.monotonic()
    assert _closed_within(slow, 5) and time.monotonic() - t0 < 4
    slow.close()
    idle = socket.create_connection(("127.0.0.1", port))  # sends nothing at all
    assert _closed_within(idle, 5)
    idle.close()
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 5000\r\n\r\n{\"model\": ")
    stalled.settimeout(5)
    answer = b""
    while b"}}" not in answer:  # the status line, headers and the JSON body (perhaps in several reads)
        block = stalled.recv(65536)
        if not block:
            break
        answer += block
    stalled.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
    body = request(service.cfg.served_name, image_urls[0])
    assert post(base, body).status_code == 200


def test_disconnects_mid_body_are_quiet(server, image_urls):
    base, service = server
    port = int(base.rsplit(":", 1)[1])
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.05)
        s.close()
    time.sleep(0.3)
    assert post(base, request(service.cfg.served_name, image_urls[0])).status_code == 200
    # the autouse check: no traceback, nothing logged at ERROR


def test_connections_over_the_limit_are_closed_at_once(serve_artifact, image_urls, server_log):
    cfg = ServeConfig(artifact=serve_artifact, max_connections=8, request_timeout_s=1.0)
    with running_server(cfg) as (base, service):
        port = int(base.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # slowloris: headers never end
        time.sleep(0.3)
        closed_early = sum(_closed_within(s, 0.05) for s in socks)
        assert closed_early >= 30 - 8
        assert all(_closed_within(s, 3) for s in socks)  # the rest: at the header deadline
        for s in socks:
            s.close()
        assert post(base, request(service.cfg.served_name, image_urls[0])).status_code == 200


def test_shutdown_does_not_wait_for_a_body_that_never_arrives(serve_artifact):
    from tokedge.serve.app import build_server, listen

    cfg = ServeConfig(artifact=serve_artifact, request_timeout_s=1.0, warmup=False)
    sock = listen("127.0.0.1", 0)
    server, _ = build_server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    deadline = time.monotonic() + 60
    while httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 5000\r\n\r\n{")
    time.sleep(0.2)
    server.should_exit = True
    thread.join(8)
    stalled.close()
    sock.close()
    assert not thread.is_alive(), "SIGTERM-style shutdown waited on the stalled body"


# -- 5 and 23: remote images ------------------------------------------------------------------------


class _Drip(threading.Thread):
    """An HTTP 'server' that answers 200 and then one body byte every 0.3 s, for ever."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()

    def run(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.drip, args=(conn,), daemon=True).start()

    def drip(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b"\x89")
                time.sleep(0.3)
        except OSError:
            pass
        finally:
            conn.close()


def test_remote_fetch_has_one_total_deadline_and_health_reports_the_stall(serve_artifact, image_files):
    drip = _Drip()
    drip.start()
    cfg = ServeConfig(artifact=serve_artifact, allow_remote_images=True, remote_timeout_s=2.0, max_remote_fetches=1,
                      stall_s=0.5)
    try:
        with running_server(cfg) as (base, service):
            model = service.cfg.served_name
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                t0 = time.monotonic()
                pending = pool.submit(post, base, request(model, f"http://127.0.0.1:{drip.port}/x.png"), None, 15)
                time.sleep(1.0)
                health = httpx.get(f"{base}/health")
                assert health.status_code == 503 and health.json()["status"] == "stalled"
                assert "remote image fetch" in health.json()["error"]
                resp = pending.result(timeout=15)
            assert time.monotonic() - t0 < 4.5
            assert_error(resp, 400, "could not fetch image_url")
            assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    finally:
        drip.stop.set()


def test_remote_fetches_follow_no_redirects_and_fail_uniformly(serve_artifact, image_files):
    ftp = socket.create_server(("127.0.0.1", 0))  # a pretend FTP server: nobody may connect to it
    ftp.settimeout(0.05)
    ftp_port = ftp.getsockname()[1]
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    not_http = socket.create_server(("127.0.0.1", 0))
    not_http_port = not_http.getsockname()[1]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(image_files[0].parent), **k)

        def do_GET(self):
            if self.path.startswith("/to-"):
                target = {"/to-ftp": f"ftp://127.0.0.1:{ftp_port}/x.png",
                          "/to-http": f"/{image_files[0].name}"}[self.path]
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    web = f"http://127.0.0.1:{httpd.server_address[1]}"
    cfg = ServeConfig(artifact=serve_artifact, allow_remote_images=True, remote_timeout_s=2.0)
    try:
        with running_server(cfg) as (base, service):
            model = service.cfg.served_name
            assert post(base, request(model, f"{web}/{image_files[0].name}")).status_code == 200
            messages = set()
            for url in (f"{web}/to-ftp", f"{web}/to-http", f"{web}/missing.png",
                        f"http://127.0.0.1:{closed_port}/x.png", f"http://127.0.0.1:{not_http_port}/x.png"):
                resp = post(base, request(model, url))
                assert_error(resp, 400, "could not fetch image_url")
                messages.add(resp.json()["error"]["message"])
            assert len(messages) == 1  # open, closed and non-HTTP ports read the same
            with pytest.raises((TimeoutError, socket.timeout)):
                ftp.accept()  # the ftp:// redirect was never followed
    finally:
        httpd.shutdown()
        ftp.close()
        not_http.close()


# -- 14: the API key out of the command line --------------------------------------------------------


def test_api_key_file_keeps_the_key_off_the_command_line(serve_artifact, tmp_path, image_urls):
    from tests.serve.conftest import wait_ready
    from tests.serve.test_cli_serve import free_port, start_cli

    key = "s3cret-from-file-42"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    port = free_port()
    proc = start_cli([str(serve_artifact), "--port", str(port), "--api-key-file", str(key_file)],
                     env={"TOKEDGE_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=60)
        assert key not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bad = start_cli([str(serve_artifact), "--api-key-file", str(empty)])
    assert bad.wait(60) == 2 and "API key is empty" in bad.stderr.read()
    both = start_cli([str(serve_artifact), "--api-key-file", str(key_file), "--api-key", "x"])
    assert both.wait(60) == 2 and "not both" in both.stderr.read()
