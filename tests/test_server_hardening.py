"""Server hardening, on a real uvicorn server on a loopback port with qwen2.5-coder-0.5b (conftest's ``served``,
shared with test_server.py): limits checked before work is done, the guard (Host, key, Content-Type,
body size), errors that never look like complete answers and never carry raw exception text."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from edgespec import server_prepare  # noqa: E402
from edgespec.server import Server, ServerConfig, create_app  # noqa: E402
from tests.conftest import KEY, N_CTX, QWEN  # noqa: E402
from tests.test_server import ask, serve_process  # noqa: E402

CHAT = "/v1/chat/completions"
COUNT = {"messages": ask("Count to three."), "max_tokens": 4, "temperature": 0, "stream": True}


def post(served, body, **kw):
    return served.http.post(CHAT, json=body, **kw)


@contextlib.contextmanager
def one_request_waits_for_the_held_model(served, max_queue: int | None = None):
    """This thread holds the model (a stream paused at its first chunk) while a streamed ``COUNT`` request has left
    the queue and waits for it: yields the client that sent it, the rest of its SSE lines and the hold (closing it
    lets that request run). The queue's limit is ``max_queue`` meanwhile; afterwards the hold is closed and the
    limit restored."""
    engine = served.srv.engine
    old = engine.max_queue
    if max_queue is not None:
        engine.max_queue = max_queue
    hold = served.rt.stream("Hello", max_tokens=4)
    try:
        next(hold)  # the model is ours until hold is closed
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            with c.stream("POST", CHAT, json=COUNT) as running:
                lines = running.iter_lines()
                next(lines)  # it has left the queue and waits for the model
                yield c, lines, hold
    finally:
        hold.close()
        engine.max_queue = old


def until(cond, limit: float = 10.0) -> None:
    """Wait up to ``limit`` seconds for ``cond()`` (the caller then asserts what it waited for)."""
    deadline = time.time() + limit
    while not cond() and time.time() < deadline:
        time.sleep(0.02)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event, data) of each server-sent event."""
    out = []
    for block in text.strip().split("\n\n"):
        event, data = None, ""
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((event, data))
    return out


# ---- limits before work ------------------------------------------------------------------------------
def test_stop_strings_are_capped_with_a_400_and_nothing_is_decoded(served):
    generated = served.metric("edgespec_generated_tokens_total")
    for stop in (["x" * 600] * 16, [f"s{i}" for i in range(17)], "y" * 513):
        r = post(served, {"messages": ask("hi"), "max_tokens": 8, "stop": stop})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stop"
    assert served.metric("edgespec_generated_tokens_total") == generated
    r = served.client.chat.completions.create(model=QWEN, messages=ask("Say hi."), max_tokens=3, temperature=0,
                                              stop=["zz" * 200] * 16)
    assert r.choices[0].message.content


def test_prompt_and_prediction_refused_before_they_are_tokenized(served, monkeypatch):
    calls = []
    real = served.rt.backend.tokenize
    monkeypatch.setattr(served.rt.backend, "tokenize", lambda text, *a, **kw: calls.append(len(text)) or real(
        text, *a, **kw))
    long = "a" * (N_CTX * server_prepare.CHARS_PER_TOKEN + 1)
    r = post(served, {"messages": ask(long), "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(served, {"messages": ask("hi"), "max_tokens": 4, "prediction": {"type": "content", "content": long}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction"
    assert calls == []  # refused by characters alone

    def no_index(*a, **kw):
        raise AssertionError("a prediction longer than the context was indexed")

    monkeypatch.setattr(server_prepare, "PredictionDrafter", no_index)
    r = post(served, {"messages": ask("hi"), "max_tokens": 4,
                      "prediction": {"type": "content", "content": "word " * (N_CTX + 10)}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction"


def test_queue_is_checked_before_the_prompt_is_tokenized(served, monkeypatch):
    """With the model held and the queue full, a new request gets its 429 without being tokenized."""
    encoded = []
    real = served.rt.encode_chat
    with one_request_waits_for_the_held_model(served, max_queue=0) as (c, lines, hold):
        monkeypatch.setattr(served.rt, "encode_chat", lambda *a, **kw: encoded.append(1) or real(*a, **kw))
        r = c.post(CHAT, json={**COUNT, "stream": False})
        assert r.status_code == 429 and encoded == []
        hold.close()
        assert "data: [DONE]" in list(lines)


def test_a_client_that_leaves_the_queue_frees_its_place(served):
    engine = served.srv.engine
    with one_request_waits_for_the_held_model(served, max_queue=1) as (c, lines, hold):
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as d:
            with d.stream("POST", CHAT, json=COUNT) as waiting:
                assert waiting.status_code == 200
                until(lambda: engine.waiting >= 1)
                assert engine.waiting == 1
        until(lambda: engine.waiting == 0)
        assert engine.waiting == 0  # its client hung up: the place is given back
        # the same for a client waiting for a whole answer (it gives up: the model is held, no answer comes)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + CHAT, json={**COUNT, "stream": False}, timeout=httpx.Timeout(60, read=1.0),
                       headers={"Authorization": f"Bearer {KEY}"})
        until(lambda: engine.waiting == 0)
        assert engine.waiting == 0
        with c.stream("POST", CHAT, json=COUNT) as third:
            assert third.status_code == 200  # not 429
            hold.close()
            assert "data: [DONE]" in third.read().decode()
        assert "data: [DONE]" in list(lines)


def test_chat_answer_length_defaults_to_2048_not_the_context(smol_path):
    import edgespec
    from edgespec.api_models import ChatRequest
    from tests.conftest import SMALL

    rt = edgespec.load(SMALL, n_ctx=8192, n_threads=2, draft="none", adapt=False)
    try:
        body = ChatRequest(messages=[{"role": "user", "content": "hi"}])
        prep = server_prepare.prepare_chat(rt, body, ServerConfig().default_max_tokens)
        assert prep.req.max_tokens == server_prepare.DEFAULT_CHAT_MAX_TOKENS == 2048
        assert server_prepare.prepare_chat(rt, body, None).req.max_tokens == 8192 - len(prep.tokens)
    finally:
        rt.close()


# ---- the guard ---------------------------------------------------------------------------------------------
def test_body_size_is_limited_while_reading_and_before_parsing(served):
    limit = served.srv.max_body()
    assert limit == 64 * N_CTX + (64 << 10)
    r = served.http.post(CHAT, content=b"{" * (limit + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"  # not a JSON error

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    r = served.http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_key_is_checked_before_the_body_is_read(served):
    bad = b"{not json"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(served.url + CHAT, content=bad, headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 401, r.text
    for path in ("/docs", "/openapi.json", "/v1/models", "/metrics"):
        assert httpx.get(served.url + path).status_code == 401, path
        assert served.http.get(path).status_code == 200, path
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # no details without the key
    assert served.http.get("/health").json() == {"status": "ok", "model": QWEN}


def test_foreign_host_gets_403_and_json_needs_a_json_content_type(served):
    port = served.url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        r = served.http.get("/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert served.http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    body = json.dumps({"messages": ask("hi"), "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = served.http.post(CHAT, content=body, headers=headers)
        assert r.status_code == 415, ctype


def test_allow_host_cors_and_details_of_a_failed_load():
    srv = Server(ServerConfig(api_key="k", allow_hosts=("my.box",), cors_origins=("http://app.example",)))
    srv.load_error = "cannot read /home/me/secret/model.gguf"
    c = TestClient(create_app(srv), base_url="http://my.box:8080")
    r = c.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "error"}  # the path only with the key
    assert "secret" in c.get("/health", headers={"Authorization": "Bearer k"}).json()["error"]
    r = c.post(CHAT, json={"messages": ask("hi")}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and "secret" not in r.text
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert c.options(CHAT, headers=pre).headers.get("access-control-allow-origin") == "http://app.example"
    other = {**pre, "Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in c.options(CHAT, headers=other).headers
    off = TestClient(create_app(Server(ServerConfig())), base_url="http://localhost")
    assert "access-control-allow-origin" not in off.options(CHAT, headers=pre).headers  # CORS off by default
    assert TestClient(create_app(Server(ServerConfig())), base_url="http://evil.example").get(
        "/health").status_code == 403


def test_deeply_nested_tool_arguments_get_400_not_500(served):
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    msgs = ask("hi") + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    r = post(served, {"messages": msgs, "max_tokens": 1})
    assert r.status_code == 400 and "arguments" in r.json()["error"]["param"]
    string = dict(call, function={"name": "f", "arguments": "[" * 50_000 + "]" * 50_000})
    r = post(served, {"messages": ask("hi") + [{"role": "assistant", "content": None, "tool_calls": [string]}],
                      "max_tokens": 1})
    assert r.status_code < 500, r.text


def test_a_lone_surrogate_in_a_message_is_a_400_naming_unicode(served):
    body = '{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 1}'  # valid JSON, not text
    r = served.http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode"


# ---- requests cut off: an error the client sees ---------------------------------------------------------
def test_backend_failure_is_an_error_without_its_text(served, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("llama_decode failed for /home/me/models/secret.gguf")

    monkeypatch.setattr(served.rt, "start", broken)
    r = post(served, {"messages": ask("hi"), "max_tokens": 4})
    assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "server_error"
    r = post(served, {"messages": ask("hi"), "max_tokens": 4, "stream": True})
    events = sse_events(r.text)
    assert events[-1][0] == "error" and "secret" not in r.text
    assert "[DONE]" not in r.text
    with pytest.raises(openai.APIError):
        list(served.client.chat.completions.create(model=QWEN, messages=ask("hi"), max_tokens=4, stream=True))


def test_request_timeout_ends_as_an_error(served):
    served.srv.cfg.request_timeout = 0.0  # every request is past its deadline at its first check
    try:
        r = post(served, {"messages": ask("Write a story."), "max_tokens": 50})
        assert r.status_code == 503 and r.json()["error"]["code"] == "request_timeout"
        r = post(served, {"messages": ask("Write a story."), "max_tokens": 50, "stream": True})
        assert sse_events(r.text)[-1][0] == "error" and "[DONE]" not in r.text
    finally:
        served.srv.cfg.request_timeout = None
    assert served.client.chat.completions.create(model=QWEN, messages=ask("Hi"), max_tokens=2).choices


def test_request_timeout_cuts_a_request_that_waits_in_the_queue(served):
    """The model is held, so a queued request never reaches the worker: its timeout still ends it, with a 503,
    and its place in the queue is given back."""
    engine = served.srv.engine
    with one_request_waits_for_the_held_model(served) as (c, lines, hold):  # that one without a timeout
        served.srv.cfg.request_timeout = 0.0
        try:
            r = c.post(CHAT, json={**COUNT, "stream": False})
            assert r.status_code == 503 and r.json()["error"]["code"] == "request_timeout"
            with c.stream("POST", CHAT, json=COUNT) as cut:
                text = cut.read().decode()
            assert sse_events(text)[-1][0] == "error" and "[DONE]" not in text
        finally:
            served.srv.cfg.request_timeout = None
        assert engine.waiting == 0 and engine._admitted == 1
        hold.close()
        assert "data: [DONE]" in list(lines)


def test_shutdown_cuts_requests_with_an_error_event_and_503(smol_path, tmp_path):
    """SIGTERM while one request streams and another waits: the stream ends with an error event and no
    [DONE], the waiting request gets a 503, and the server exits cleanly."""
    import signal

    from tests.conftest import SMALL

    proc, url = serve_process(tmp_path, ["--model", SMALL, "--n-ctx", "1024", "--threads", "2", "--draft", "none",
                                         "--no-adapt"])
    try:
        waiting: dict = {}

        def second():
            waiting["r"] = httpx.post(url + CHAT, json={"messages": ask("Hi"), "max_tokens": 4}, timeout=120)

        count = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0, "stream": True}  # goes on and on
        with httpx.stream("POST", url + "/v1/completions", json=count, timeout=120) as r:
            lines = r.iter_lines()
            got = []
            for line in lines:
                got.append(line)
                if line.startswith("data: ") and len(got) > 6:
                    break
            t = threading.Thread(target=second)
            t.start()
            deadline = time.time() + 30
            while "edgespec_queue_length 1" not in httpx.get(url + "/metrics").text:
                assert time.time() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            got += list(lines)
        t.join(60)
        text = "\n".join(got)
        assert "event: error" in text and "[DONE]" not in text
        assert waiting["r"].status_code == 503
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
