"""Shared fixtures: the real small models (pulled on first use) and their backends."""

import os

import pytest

from edgespec import registry

# Huge pages cost 0.35-2.5 s per model load (tests load models, and start servers, many times) and change no
# output; test_backend checks that with them switched on explicitly. Subprocesses inherit this.
os.environ.setdefault("EDGESPEC_HUGE_PAGES", "0")

SMALL = "smollm2-135m"
QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="session")
def smol_path():
    return registry.pull(SMALL)


@pytest.fixture(scope="session")
def qwen_path():
    return registry.pull(QWEN)


def make_backend(path, **kw):
    from edgespec.backends.llama_cpp import LlamaCppBackend

    kw.setdefault("n_ctx", 2048)
    kw.setdefault("n_threads", 2)
    return LlamaCppBackend(path, **kw)


@pytest.fixture(scope="module")
def smol(smol_path):
    b = make_backend(smol_path)
    yield b
    b.close()


@pytest.fixture(scope="module")
def qwen(qwen_path):
    b = make_backend(qwen_path)
    yield b
    b.close()


@pytest.fixture(params=[SMALL, QWEN])
def backend(request):
    return request.getfixturevalue("smol" if request.param == SMALL else "qwen")
