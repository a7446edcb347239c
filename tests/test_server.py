"""The OpenAI-compatible server: a real uvicorn server on a loopback port, driven by the real ``openai`` client
(and httpx for raw bodies), serving qwen2.5-coder-0.5b (conftest's ``served``: started once for this module and
test_server_hardening.py, idle with empty caches at the start of each test). Greedy answers are compared with the
in-process ``Runtime`` on the same model; ``exact=True`` keeps verify batches bit-identical to plain decoding, and
each comparison starts both sides from the same cache state (``fresh``)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import edgespec  # noqa: E402
from edgespec.server import Server, ServerConfig, create_app  # noqa: E402
from tests.conftest import KEY, N_CTX, QWEN, Served  # noqa: E402


def ask(text: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def reference(served: Served, messages: list[dict], max_tokens: int) -> str:
    served.fresh()
    return served.rt.chat(messages, max_tokens=max_tokens, temperature=0).text


# ---- basics ------------------------------------------------------------------------------------------
def test_health_models_and_loading_state(served):
    r = httpx.get(served.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = served.client.models.list()
    assert [m.id for m in models.data] == [QWEN]
    assert models.data[0].model_dump()["context_length"] == N_CTX

    from fastapi.testclient import TestClient  # a server whose model is still loading

    loading = TestClient(create_app(Server(ServerConfig())), base_url="http://localhost")
    assert loading.get("/health").status_code == 503
    r = loading.post("/v1/chat/completions", json={"messages": ask("hi")})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"


def test_chat_equals_runtime_streaming_and_not(served):
    msgs = ask("Write a Python function that returns the square of x.")
    want = reference(served, msgs, 24)
    served.fresh()
    r = served.client.chat.completions.create(model=QWEN, messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    extra = r.model_dump()["edgespec"]
    assert extra["drafter"] == "ngram" and extra["tokens_per_verify"] >= 1

    served.fresh()
    chunks = list(served.client.chat.completions.create(model=QWEN, messages=msgs, max_tokens=24, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_equal_runtime(served):
    served.fresh()
    want = served.rt.generate("def fibonacci(n):", max_tokens=16, temperature=0).text
    served.fresh()
    r = served.client.completions.create(model=QWEN, prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == 16
    served.fresh()
    chunks = list(served.client.completions.create(model=QWEN, prompt="def fibonacci(n):", max_tokens=16,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


# ---- many clients, disconnects, the queue ------------------------------------------------------------
def test_concurrent_clients_get_their_own_answers(served):
    prompts = [ask(f"What is {a} + {b}? Answer with the number only.") for a, b in
               [(2, 3), (10, 7), (31, 4), (6, 6), (100, 1), (8, 13), (21, 21), (5, 50)]]
    want = [served.rt.chat(p, max_tokens=6, temperature=0).text for p in prompts]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
            got[i] = c.chat.completions.create(model=QWEN, messages=prompts[i], max_tokens=6,
                                               temperature=0).choices[0].message.content
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert [got[i] for i in range(len(prompts))] == want


def _generated(served: Served) -> float:
    return served.metric("edgespec_generated_tokens_total")


def _stops_growing(served: Served) -> None:
    """The token counter stands still: generation stopped."""
    deadline = time.time() + 10
    while served.metric("edgespec_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    before = _generated(served)
    time.sleep(1.0)
    assert _generated(served) == before
    assert served.metric("edgespec_requests_running") == 0


def test_disconnect_mid_stream_stops_generation(served):
    cancelled = served.metric("edgespec_requests_cancelled_total")
    body = {"messages": ask("Write a long story about a robot."), "max_tokens": 500, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", served.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    n += 1
                if n >= 4:
                    break  # hang up mid-stream
    _stops_growing(served)
    assert served.metric("edgespec_requests_cancelled_total") == cancelled + 1
    t0 = time.time()
    r = served.client.chat.completions.create(model=QWEN, messages=ask("Say hi."), max_tokens=4, temperature=0)
    assert r.choices[0].message.content and time.time() - t0 < 30


def test_disconnect_while_waiting_for_a_whole_answer(served):
    generated, finished = _generated(served), served.metric("edgespec_completion_tokens_total")
    cancelled, before = served.metric("edgespec_requests_cancelled_total"), served.rt.last_stats
    body = {"messages": ask("Write a long story about a cat."), "max_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(60, read=2.0))
    _stops_growing(served)
    stats = served.rt.last_stats  # the request's own statistics: the only request since
    assert stats is not before and stats.finish_reason == "cancelled" and stats.generated_tokens < 500
    # the live counter grew by exactly the tokens that request generated before it was stopped, as did the
    # count of finished requests' tokens, and it was counted as cancelled
    assert _generated(served) == generated + stats.generated_tokens
    assert served.metric("edgespec_completion_tokens_total") == finished + stats.generated_tokens
    assert served.metric("edgespec_requests_cancelled_total") == cancelled + 1


def test_full_queue_gets_429_with_retry_after(served):
    """The test itself holds the model (a stream paused at its first chunk), so the engine's request cannot
    finish while the queue is probed: the outcome does not depend on how fast the machine decodes."""
    engine = served.srv.engine
    body = {"messages": ask("Count from one to ten in words."), "max_tokens": 8, "temperature": 0, "stream": True}
    old, engine.max_queue = engine.max_queue, 1
    hold = served.rt.stream("Hello", max_tokens=4)
    try:
        next(hold)  # the model is ours until hold is closed
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as running:
                lines = running.iter_lines()
                next(lines)  # it has left the queue and waits for the model
                assert engine.current is not None and engine.waiting == 0
                with c.stream("POST", "/v1/chat/completions", json=body) as waiting:
                    deadline = time.time() + 10
                    while engine.waiting < 1 and time.time() < deadline:
                        time.sleep(0.02)
                    assert engine.waiting == 1
                    r = c.post("/v1/chat/completions", json={**body, "stream": False})
                    assert r.status_code == 429
                    assert int(r.headers["Retry-After"]) >= 1
                    assert r.json()["error"]["code"] == "queue_full"
                    assert waiting.status_code == 200
                    hold.close()  # both queued requests now run to the end
                    assert "[DONE]" in waiting.read().decode()
                assert "data: [DONE]" in list(lines)
    finally:
        hold.close()
        engine.max_queue = old
    _stops_growing(served)


# ---- authentication and errors -----------------------------------------------------------------------
def test_api_key(served):
    body = {"messages": ask("hi"), "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdDprZXk="}):
        r = httpx.post(served.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served.url + "/v1/models").status_code == 401
    assert httpx.get(served.url + "/metrics").status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=QWEN, messages=ask("hi"), max_tokens=1)


@pytest.mark.parametrize("body,param", [
    ('{"messages": [{"role": "user", "content": "hi"}', None),  # malformed JSON
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 5}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"42": 5}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "audio": {"voice": "alloy"}}, "audio"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": True}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
])
def test_bad_requests_get_400_with_an_error_object(served, body, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = served.http.post("/v1/chat/completions", **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_prompt_too_long_is_refused_with_token_counts(served):
    long = "word " * (N_CTX + 100)
    r = served.http.post("/v1/chat/completions", json={"messages": ask(long), "max_tokens": 8})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and str(N_CTX) in err["message"]
    r = served.http.post("/v1/completions", json={"prompt": "hello " * 1000, "max_tokens": 1500})
    assert r.status_code == 400 and "1500" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(model=QWEN, messages=ask(long), max_tokens=8)
    assert served.http.get("/nowhere").json()["error"]["type"] == "not_found_error"
    r = served.client.chat.completions.create(model=QWEN, messages=ask("Say hi."), max_tokens=2, temperature=0)
    assert r.choices[0].message.content  # still serving


# ---- the prompt cache ----------------------------------------------------------------------------------
SYSTEMS = {
    "a": "You are a terse assistant for a team of astronomers. They ask about stars, planets and telescopes, and "
         "they want short factual answers of one sentence. Never use lists. Never use headings.",
    "b": "Bonjour! You help a bakery in Lyon with its recipes and its suppliers. Keep every answer to one short "
         "sentence, in plain English, and mention flour whenever you can.",
}
QUESTIONS = {"a": ["What is a red dwarf?", "How far away is the nearest one?", "Can we see it without a telescope?"],
             "b": ["How long should croissant dough rest?", "Which flour works best?", "How do we store it overnight?"]}


def _conversation_turns(ask_fn, order: list[str]) -> dict[str, list]:
    history = {k: [{"role": "system", "content": SYSTEMS[k]}] for k in SYSTEMS}
    out: dict[str, list] = {k: [] for k in SYSTEMS}
    turn = {k: 0 for k in SYSTEMS}
    for k in order:
        history[k].append({"role": "user", "content": QUESTIONS[k][turn[k]]})
        text, usage = ask_fn(history[k])
        history[k].append({"role": "assistant", "content": text})
        out[k].append((text, usage))
        turn[k] += 1
    return out


def test_prompt_cache_switches_conversations_without_reprefill(served):
    def in_process(msgs):
        return served.rt.chat(msgs, max_tokens=12, temperature=0).text, None

    want = {}
    for k in SYSTEMS:  # each conversation alone, its turns one after another
        served.fresh()
        want[k] = [t for t, _ in _conversation_turns(in_process, [k] * 3)[k]]

    def via_server(msgs):
        r = served.client.chat.completions.create(model=QWEN, messages=msgs, max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.usage

    served.fresh()
    hits = served.metric("edgespec_prompt_cache_hits_total")
    got = _conversation_turns(via_server, ["a", "b"] * 3)  # alternating
    for k in SYSTEMS:
        assert [t for t, _ in got[k]] == want[k], k  # no state leaks between conversations
        for (_, prev), (_, usage) in zip(got[k], got[k][1:], strict=False):
            # every later turn evaluates only its new tokens: the whole previous prompt came from the cache
            assert usage.prompt_tokens_details.cached_tokens >= prev.prompt_tokens
            assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens < 40
    assert served.metric("edgespec_prompt_cache_hits_total") >= hits + 4
    assert served.metric("edgespec_prompt_cache_bytes") > 0


# ---- predicted outputs ----------------------------------------------------------------------------------
CODE = '''def area_of_circle(radius):
    """Return the area of a circle."""
    pi = 3.14159
    return pi * radius * radius


def perimeter_of_circle(radius):
    """Return the perimeter of a circle."""
    pi = 3.14159
    return 2 * pi * radius
'''


def test_predicted_outputs_same_text_most_tokens_accepted(served, monkeypatch):
    msgs = ask("Rename the parameter radius to r in both functions. Reply with only the full code.\n\n"
               f"```python\n{CODE}```")
    # Whether drafting pays is the controller's call on this machine's measured verify costs (on an AVX2 CPU
    # 2 and 3 rows cost ~1.9 and ~2.9 steps, and under exact=True a prediction then never pays; another
    # process's load skews them too). Fix the depth at the exact cap, so that the test checks the drafter's
    # alignment and what the target accepts, not the machine.
    from edgespec import runtime

    real = runtime.controller_for
    monkeypatch.setattr(runtime, "controller_for", lambda drafter, **kw: real(drafter, fixed_depth=2, **kw))
    served.fresh()
    plain = served.client.chat.completions.create(model=QWEN, messages=msgs, max_tokens=120, temperature=0)
    served.fresh()
    pred = served.client.chat.completions.create(model=QWEN, messages=msgs, max_tokens=120, temperature=0,
                                                 prediction={"type": "content", "content": CODE})
    assert pred.choices[0].message.content == plain.choices[0].message.content
    details = pred.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0.3 * pred.usage.completion_tokens
    assert details.accepted_prediction_tokens > details.rejected_prediction_tokens
    assert pred.model_dump()["edgespec"]["drafter"] == "prediction"
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0


# ---- tools ------------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_tool_call_parsed_with_json_arguments(served):
    msgs = ask("What is the weather in Paris right now?")
    r = served.client.chat.completions.create(model=QWEN, messages=msgs, tools=TOOLS, max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)

    chunks = list(served.client.chat.completions.create(model=QWEN, messages=msgs, tools=TOOLS, max_tokens=40,
                                                        temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    forced = served.client.chat.completions.create(
        model=QWEN, messages=ask("Tell me about Rome."), tools=TOOLS, max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)

    # the answer to the tool goes back through the template
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18, "sky": "clear"}'}]
    r = served.client.chat.completions.create(model=QWEN, messages=follow, tools=TOOLS, max_tokens=16,
                                              temperature=0)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls  # what the 0.5B model does next varies
    assert r.usage.prompt_tokens > forced.usage.prompt_tokens


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from edgespec import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve", "--model", QWEN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'edgespec[server]'" in err[0]


def serve_process(tmp_path, args: list[str], env: dict | None = None):
    """``edgespec serve ARGS`` in a subprocess on a free loopback port, once /health says 200: (proc, url).
    Its output goes to ``tmp_path / "serve.log"``."""
    import os
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "edgespec", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise


def test_edgespec_serve_command_answers_and_stops_cleanly_on_sigterm(smol_path, tmp_path):
    import signal

    from tests.conftest import SMALL

    proc, url = serve_process(tmp_path, ["--model", SMALL, "--n-ctx", "512", "--threads", "2", "--draft", "none",
                                         "--no-adapt"], env={"EDGESPEC_API_KEY": "env-key"})
    port = url.rsplit(":", 1)[1]
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        r = client.chat.completions.create(model=SMALL, messages=ask("Hi"), max_tokens=3, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens == 3
        assert httpx.post(url + "/v1/chat/completions", json={"messages": ask("Hi")}).status_code == 401
        deadline = time.time() + 10
        while "curl " not in (tmp_path / "serve.log").read_text() and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}/v1" in out and "curl " in out and "Authorization: Bearer" in out
    assert "runtime closed" in out


def test_prompt_cache_is_capped_by_the_memory_budget(smol_path):
    """Under a budget the prompt cache's cap is what the plan leaves free (not the 64 GiB asked for), and every save
    is checked against the live headroom: a state that fitted is refused once the process holds more memory, and
    fits again once that memory is freed."""
    from edgespec.memory.live import rss_bytes
    from edgespec.memory.planner import SAFETY
    from edgespec.server import prometheus
    from tests.conftest import SMALL, budget_beyond_rss

    budget = budget_beyond_rss(400 << 20)  # the served model, among others, is already held
    asked = 64 << 30
    rt = edgespec.load(SMALL, n_ctx=1024, n_threads=2, draft="none", memory_budget=budget, adapt=False)
    srv = Server(ServerConfig(cache_bytes=asked))
    try:
        srv.attach(rt)
        cache = srv.cache
        assert rt.plan.budget == budget
        cap = int(budget * (1 - SAFETY) - rt.plan.footprint.total)
        assert 0 < cap < asked and cache.cfg.max_bytes == cap
        text = prometheus(srv)
        assert f"edgespec_memory_budget_bytes {budget}\n" in text and f"edgespec_prompt_cache_max_bytes {cap}\n" in text
        # the headroom is the budget (less the live guard's reserve) minus what the process holds now
        limit = budget * (1 - rt.controller.memory.reserve)
        low, room, high = limit - rss_bytes(), cache.headroom(), limit - rss_bytes()
        assert min(low, high) - (1 << 20) <= room <= max(low, high) + (1 << 20), (low, room, high)

        short = rt.tokens_of("def add(a, b):\n    return a + b\n" * 4)  # over min_tokens, ~1 MiB of KV
        long = rt.tokens_of("Numbers: " + ", ".join(str(i) for i in range(400)))[:800]  # ~18 MiB of KV
        per_token = rt.backend.memory().kv_bytes_per_token
        rt.generate(short, max_tokens=2)
        rt.generate(long, max_tokens=2)  # the switch saves the short conversation's state: room enough
        assert (cache.stats.saves, cache.stats.skipped, len(cache)) == (1, 0, 1)
        need = per_token * len(rt.backend.cached) - cache.nbytes  # what saving the long state adds
        held = bytearray(max(0, cache.headroom() - need // 2))  # touched: resident; less room left than needed
        assert cache.headroom() < need
        rt.generate(short, max_tokens=2)  # back to the short one: restored, the long state does not fit now
        assert (cache.stats.hits, cache.stats.saves, cache.stats.skipped, len(cache)) == (1, 1, 1, 1)
        del held  # freed: the same state fits again
        rt.generate(long, max_tokens=2)
        rt.generate(short, max_tokens=2)
        assert (cache.stats.saves, cache.stats.skipped, len(cache)) == (2, 1, 2)
    finally:
        srv.close()
