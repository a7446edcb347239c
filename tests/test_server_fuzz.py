"""Schema-driven fuzzing of the server: schemathesis generates requests from the app's own OpenAPI schema (valid
ones and invalid ones), a bounded, derandomized number per endpoint, against smollm2-135m with a tiny context.
No answer may be a 5xx, none may hang, every refusal carries an OpenAI error object, and the server answers a
normal request afterwards."""

from __future__ import annotations

import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

import edgespec  # noqa: E402
from edgespec.server import Server, ServerConfig, create_app  # noqa: E402
from tests.conftest import SMALL  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CASES = {schemathesis.GenerationMode.POSITIVE: 6, schemathesis.GenerationMode.NEGATIVE: 4}  # per endpoint


@pytest.fixture(scope="module")
def fuzz_server(smol_path):
    rt = edgespec.load(SMALL, n_ctx=128, n_threads=2, draft="none", adapt=False)
    srv = Server(ServerConfig(model_name=SMALL, api_key=KEY, default_max_tokens=8, allow_hosts=("testserver",)))
    srv.attach(rt)
    yield srv
    srv.close()


def test_fuzz_no_server_errors(fuzz_server):
    app = create_app(fuzz_server)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)  # the schema needs the key too
    statuses: Counter = Counter()
    slowest = (0.0, "")
    for result in schema.get_all_operations():
        op = result.ok()
        for mode, n in CASES.items():
            @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal slowest
                t0 = time.monotonic()
                r = case.call(headers=AUTH, timeout=120)
                took = time.monotonic() - t0
                if took > slowest[0]:
                    slowest = (took, f"{case.method} {case.path} {case.body!r} -> {r.status_code}")
                statuses[(case.path, r.status_code)] += 1
                assert r.status_code < 500, f"{case.method} {case.path} {case.body!r}: {r.status_code} {r.text[:300]}"
                if r.status_code >= 400 and case.path.startswith("/v1"):
                    err = r.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"}

            try:
                run()
            except Unsatisfiable:  # no invalid request can be made for an endpoint without parameters
                assert mode == schemathesis.GenerationMode.NEGATIVE
    print(f"slowest: {slowest[1]} took {slowest[0]:.1f} s; {sum(statuses.values())} cases: {dict(statuses)}")
    assert slowest[0] < 120, f"{slowest[1]} took {slowest[0]:.0f} s"
    assert sum(statuses.values()) >= 30
    assert any(code == 200 for _, code in statuses)  # not everything was refused
    with TestClient(app) as client:  # still serving
        r = client.post("/v1/chat/completions", headers=AUTH,
                        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
