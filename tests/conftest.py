"""Shared fixtures: the real small models (pulled on first use), their llama.cpp backends and a plain runtime
(loaded once per module), and the served qwen2.5-coder-0.5b (started once for the server tests).

A test gets a shared backend or runtime with an empty KV cache (``smol``, ``qwen``, ``backend``, ``smol_rt``), so
it does not depend on what ran before it. Tests that need a model of their own still load one: other options, a
runtime they close or break, a crash or exit, memory measured in a fresh process.

Models are not kept for the whole session: a load under a memory budget counts what the process already holds, so
a model kept from an earlier module would change the plans of later tests. The served model is closed after the
last test that uses it. A tiny distillation collection from smollm2-135m (``smol_shards``: files, no model) is
collected once for the session and read by test_distill and test_redrafter."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

import pytest

from edgespec import registry

# Two pytest-xdist workers (pyproject's addopts) on a core each: llama.cpp caps its threads at the CPUs the process
# may use, so each worker decodes on one thread and neither waits on the other's spinning threads; torch, OpenMP
# and BLAS are held to the worker's share too. Subprocesses inherit the affinity.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    _n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if 1 < _n <= len(_cpus):
        _share = _cpus[int(_WORKER[2:]) % _n::_n]
        os.sched_setaffinity(0, _share)
        for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[_var] = str(len(_share))

# Huge pages cost 0.35-2.5 s per model load (tests load models, and start servers, many times) and change no
# output; test_backend checks that with them switched on explicitly. Subprocesses inherit this.
os.environ.setdefault("EDGESPEC_HUGE_PAGES", "0")

SMALL = "smollm2-135m"
QWEN = "qwen2.5-coder-0.5b"
KEY = "test-key"  # the served model's API key
N_CTX = 2048  # the served model's context


@pytest.fixture(scope="session")
def smol_path():
    return registry.pull(SMALL)


@pytest.fixture(scope="session")
def qwen_path():
    return registry.pull(QWEN)


def budget_beyond_rss(extra: int) -> int:
    """A memory budget whose plan leaves ``extra`` bytes beyond what the test process already holds (the live
    guard counts the whole process, other modules' models among it)."""
    from edgespec.memory.live import rss_bytes
    from edgespec.memory.planner import SAFETY

    return int((rss_bytes() + extra) / (1 - SAFETY))


def make_backend(path, **kw):
    from edgespec.backends.llama_cpp import LlamaCppBackend

    kw.setdefault("n_ctx", 2048)
    kw.setdefault("n_threads", 2)
    return LlamaCppBackend(path, **kw)


@pytest.fixture(scope="module")
def smol_backend(smol_path):
    """smollm2-135m (context 2048, 2 threads) for the module: use ``smol``, which empties its cache."""
    b = make_backend(smol_path)
    yield b
    b.close()


@pytest.fixture(scope="module")
def qwen_backend(qwen_path):
    """qwen2.5-coder-0.5b (context 2048, 2 threads) for the module: use ``qwen``, which empties its cache."""
    b = make_backend(qwen_path)
    yield b
    b.close()


@pytest.fixture
def smol(smol_backend):
    smol_backend.truncate(0)
    yield smol_backend
    smol_backend.truncate(0)


@pytest.fixture
def qwen(qwen_backend):
    qwen_backend.truncate(0)
    yield qwen_backend
    qwen_backend.truncate(0)


@pytest.fixture(params=[SMALL, QWEN])
def backend(request):
    return request.getfixturevalue("smol" if request.param == SMALL else "qwen")


def reset_runtime(rt) -> None:
    """An idle runtime as if just loaded, for the next test: an empty KV cache and no prompt cache."""
    deadline = time.time() + 10
    while rt._owner is not None and time.time() < deadline:  # a dropped stream frees the model as it is collected
        gc.collect()
        time.sleep(0.01)
    assert not rt.closed and rt._owner is None, "a test left its shared runtime closed or held"
    rt.backend.truncate(0)
    rt.prompt_cache = None


@pytest.fixture(scope="module")
def _smol_rt(smol_backend):
    from edgespec.runtime import Runtime

    return Runtime(smol_backend, SMALL)  # not closed: smol_backend closes the backend


@pytest.fixture
def smol_rt(_smol_rt):
    """A plain (no drafter) runtime on the shared smollm2-135m backend, idle with an empty cache."""
    reset_runtime(_smol_rt)
    yield _smol_rt
    reset_runtime(_smol_rt)


# ---- a tiny distillation collection ----------------------------------------------------------------------
DISTILL_POSITIONS = 500  # two or three tiny shards (test_redrafter trains on one and holds out the rest)


def distill_config():
    """The tiny collection's config: two answers at a time for three instructions (a freed slot takes the next
    one), six rows per decode (prompts are prefilled over several steps, teacher-forced text fills what is left)."""
    from edgespec.models.training.collect import CollectConfig

    return CollectConfig(prompts_per_shard=3, texts_per_shard=2, answer_tokens=16, max_prompt=128, tf_len=32,
                         min_tf=16, top_k=8, slots=2, rows=6)


@pytest.fixture(scope="session")
def decontaminator():
    from edgespec.models.training.corpus import Decontaminator

    return Decontaminator()  # shared: reading HumanEval once


@pytest.fixture(scope="session")
def smol_shards(smol_path, decontaminator, tmp_path_factory):
    """A tiny distillation collection from smollm2-135m (``distill_config``, ``DISTILL_POSITIONS``): its own
    answers, their prompts and teacher-forced text in at least two shards, collected once for test_distill and
    test_redrafter, which only read it (files: no model is kept). ``dir`` holds the plan and ``paths`` the shards."""
    from types import SimpleNamespace

    from edgespec.models.training import collect as col

    out, cfg = tmp_path_factory.mktemp("distill"), distill_config()
    be = col.open_backend(smol_path, cfg, threads=1)
    try:
        shards = col.collect(be, out, cfg, DISTILL_POSITIONS, progress=False, decontaminate=decontaminator)
        assert len(shards) >= 2 and all(p.exists() for p in shards)
        # resumes: nothing left to do
        assert col.collect(be, out, cfg, DISTILL_POSITIONS, progress=False, decontaminate=decontaminator) == shards
    finally:
        be.close()
    return SimpleNamespace(dir=out, paths=shards)


# ---- the served model ----------------------------------------------------------------------------------
class Served:
    def __init__(self, rt, srv, url: str):
        import httpx
        import openai

        self.rt, self.srv, self.url = rt, srv, url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def fresh(self) -> None:
        """Empty live cache and prompt cache (the server is idle)."""
        self.rt.backend.truncate(0)
        if self.srv.cache is not None:
            self.srv.cache.clear()


def serve_in_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


_LAST_SERVED: list[str] = []  # the node id of the last collected test that uses the served model
_CLOSE_SERVED: list = []  # how to stop it, while it runs


def pytest_collection_finish(session):
    users = [item.nodeid for item in session.items if "_served" in getattr(item, "fixturenames", ())]
    _LAST_SERVED[:] = users[-1:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if _CLOSE_SERVED and [item.nodeid] == _LAST_SERVED:  # the model's memory is not carried into later tests
        _CLOSE_SERVED.pop()()


@pytest.fixture(scope="session")
def _served(qwen_path):
    """qwen2.5-coder-0.5b (n-gram drafter, exact verifies) behind a real uvicorn server on a loopback port, for
    test_server.py and test_server_hardening.py: loaded, calibrated and started once, stopped after the last test
    that uses it."""
    for name in ("fastapi", "openai", "httpx", "uvicorn"):
        pytest.importorskip(name)
    import edgespec
    from edgespec.server import Server, ServerConfig, create_app

    rt = edgespec.load(QWEN, n_ctx=N_CTX, n_threads=2, draft="ngram", exact=True, adapt=False)
    srv = Server(ServerConfig(model_name=QWEN, api_key=KEY, max_queue=16))
    srv.attach(rt)
    server, thread, url = serve_in_thread(create_app(srv))

    def stop():
        server.should_exit = True
        thread.join(30)
        srv.close()

    _CLOSE_SERVED.append(stop)
    yield Served(rt, srv, url)
    if _CLOSE_SERVED:
        _CLOSE_SERVED.pop()()


@pytest.fixture
def served(_served):
    """The shared server, idle, with empty caches; after the test it is idle again with its settings unchanged."""
    engine, cfg = _served.srv.engine, _served.srv.cfg
    settings = (engine.max_queue, cfg.request_timeout)
    _served.fresh()
    yield _served
    deadline = time.time() + 30
    while (engine.current is not None or engine.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.current is None and engine.waiting == 0, "a test left the shared server busy"
    assert (engine.max_queue, cfg.request_timeout) == settings, "a test left the shared server's settings changed"
    _served.fresh()
