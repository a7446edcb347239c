"""The server under --memory-budget: a request the live headroom cannot take gets 503 with Retry-After (and is
counted), never a run over the budget; with room it is served. Real runtime (smollm2-135m under a budget) and
the real app, in process."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import edgespec  # noqa: E402
from edgespec.server import Server, ServerConfig, create_app  # noqa: E402
from edgespec.server_memory import TOKEN_BYTES, request_bytes, shortfall  # noqa: E402
from tests.conftest import SMALL  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}


def test_request_bytes_and_shortfall():
    assert request_bytes(1000, 10, 5) == 2000 + 3 * TOKEN_BYTES * 10 + (TOKEN_BYTES + 8) * 5
    assert request_bytes(0, 0, 0, drafter_bytes=77) == 77
    assert shortfall(None, 10**12) == 0  # no budget: nothing is refused
    assert shortfall(lambda: 5000, 4000) == 0 and shortfall(lambda: 5000, 7000) == 2000
    assert shortfall(lambda: -100, 1) == 101  # already over: everything waits


def test_a_request_the_budget_cannot_take_gets_503_with_retry_after():
    from edgespec.memory.live import rss_bytes

    # the budget counts the whole process: room for this runtime beyond what the test process already holds
    budget = rss_bytes() + (1 << 30)
    rt = edgespec.load(SMALL, n_ctx=256, n_threads=2, draft="none", adapt=False, memory_budget=budget)
    srv = Server(ServerConfig(model_name=SMALL, default_max_tokens=8))
    srv.attach(rt)
    try:
        assert srv.headroom is not None and srv.headroom() > 0  # the plan's live guard
        client = TestClient(create_app(srv), base_url="http://localhost")
        ok = client.post("/v1/chat/completions", json=BODY)
        assert ok.status_code == 200, ok.text
        room = srv.headroom
        srv.headroom = lambda: 1024  # what a process near its budget has left: less than this request needs
        refused = client.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "memory_budget" and int(refused.headers["Retry-After"]) >= 1
        assert "edgespec_requests_refused_memory_total 1" in client.get("/metrics").text
        srv.headroom = room  # room again: served, and the same answer as before
        again = client.post("/v1/chat/completions", json=BODY)
        assert again.status_code == 200 and again.json()["choices"][0]["message"] == ok.json()["choices"][0]["message"]
    finally:
        srv.close()


def test_without_a_budget_nothing_is_refused_for_memory():
    rt = edgespec.load(SMALL, n_ctx=256, n_threads=2, draft="none", adapt=False)
    srv = Server(ServerConfig(model_name=SMALL, default_max_tokens=8))
    srv.attach(rt)
    try:
        assert srv.headroom is None
        r = TestClient(create_app(srv), base_url="http://localhost").post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200, r.text
    finally:
        srv.close()
