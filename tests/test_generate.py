"""Plain generation, the runtime API and chat sessions, on real models."""

import threading

import numpy as np
import pytest

from edgespec.generate import PromptTooLongError
from edgespec.runtime import Runtime
from edgespec.sampling import SamplingParams, probs
from tests.conftest import make_backend

PROMPTS = [
    "def is_prime(n):\n",
    "The capital of France is",
    "# Sort a list of dictionaries by a key\n",
    "import numpy as np\n\nx = np.",
]


@pytest.fixture(scope="module")
def rt_small(smol_path):
    rt = Runtime(make_backend(smol_path), "smollm2-135m")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def rt_qwen(qwen_path):
    rt = Runtime(make_backend(qwen_path), "qwen2.5-coder-0.5b")
    yield rt
    rt.close()


@pytest.mark.parametrize("which", ["smol", "qwen"])
def test_greedy_matches_llama_cpp_python(which, rt_small, rt_qwen, smol_path, qwen_path):
    """Independent reference: llama-cpp-python's own high-level greedy completion.

    Both run llama.cpp with flash attention (edgespec's default); the attention kernel changes the
    float rounding, so with different kernels near-ties can flip after a few dozen tokens.
    """
    from llama_cpp import Llama

    rt, path = (rt_small, smol_path) if which == "smol" else (rt_qwen, qwen_path)
    ref = Llama(model_path=str(path), n_ctx=1024, n_threads=rt.backend.n_threads, verbose=False, flash_attn=True)
    for prompt in PROMPTS:
        toks = rt.backend.tokenize(prompt, add_special=True, parse_special=False)
        want = ref.create_completion(toks, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)
        got = rt.generate(toks, max_tokens=24)
        assert got.text == want["choices"][0]["text"], prompt
        assert got.stats.generated_tokens == want["usage"]["completion_tokens"]
    ref.close()


def test_seed_determinism_and_sampling_varies(rt_small):
    kw = dict(max_tokens=20, temperature=1.0, top_p=0.95)
    a = rt_small.generate("Once upon a time", seed=7, **kw)
    b = rt_small.generate("Once upon a time", seed=7, **kw)
    c = rt_small.generate("Once upon a time", seed=8, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_max_tokens_and_stop_string(rt_small):
    full = rt_small.generate("1, 2, 3, 4, 5,", max_tokens=30)
    assert full.stats.generated_tokens == 30 and full.stats.finish_reason == "length"
    # stop at a string that occurs in the greedy continuation
    stop = full.text[8:11]
    cut = rt_small.generate("1, 2, 3, 4, 5,", max_tokens=30, stop=[stop])
    assert cut.stats.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_streamed_chunks_equal_text(rt_small):
    g = rt_small.stream("A haiku about rain:", max_tokens=24, stop=["\n\n"])
    chunks = list(g)
    whole = rt_small.generate("A haiku about rain:", max_tokens=24, stop=["\n\n"])
    assert "".join(chunks) == whole.text and g.tokens == whole.tokens
    s = g.stats  # the stream's own statistics, consistent with what it produced
    assert s.prompt_tokens == len(rt_small.tokens_of("A haiku about rain:"))
    assert s.generated_tokens == len(g.tokens) and s.finish_reason in ("stop", "length", "eos")
    assert s.tok_s == pytest.approx(s.generated_tokens / s.decode_s)
    assert 0 < s.ttft_s < s.total_s and s.ttft_s + s.decode_s == pytest.approx(s.total_s)
    assert rt_small.last_stats is whole.stats and whole.stats.prefill_tokens < s.prompt_tokens  # cache reused


def test_eos_ends_generation(rt_small):
    r = rt_small.chat([{"role": "user", "content": "Say just the word: yes"}], max_tokens=200)
    assert r.stats.finish_reason == "eos"
    assert r.stats.generated_tokens < 200


def test_cancel_event_and_callback(rt_small):
    ev = threading.Event()
    it = rt_small.stream("Count: 1, 2, 3,", max_tokens=200, cancel=ev)
    got = [next(it)]
    ev.set()
    got += list(it)
    assert rt_small.last_stats.finish_reason == "cancelled"
    assert rt_small.last_stats.generated_tokens < 10
    n = {"calls": 0}

    def stop_after_five():
        n["calls"] += 1
        return n["calls"] > 5

    r = rt_small.generate("Count: 1, 2, 3,", max_tokens=200, cancel=stop_after_five)
    assert r.stats.finish_reason == "cancelled" and r.stats.generated_tokens == 5


def test_threads_are_serialized(rt_small):
    prompts = ["def add(a, b):", "The moon is", "for i in range(", "Dear Sir,"]
    want = {p: rt_small.generate(p, max_tokens=12).text for p in prompts}
    got = {}

    def work(p):
        got[p] = rt_small.generate(p, max_tokens=12).text

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_chat_reuses_kv_cache_across_turns(rt_qwen):
    sess = rt_qwen.session(system="You are terse.")
    "".join(sess.send("Name a prime number.", max_tokens=16))
    first = sess.last_stats
    assert first.prefill_tokens == first.prompt_tokens
    question = "And another one?"
    "".join(sess.send(question, max_tokens=16))
    second = sess.last_stats
    new_tokens = len(rt_qwen.backend.tokenize(question, add_special=False))
    assert second.prompt_tokens > first.prompt_tokens + new_tokens
    # only the new user turn plus a few template tokens (and the last reply token) are evaluated
    assert second.prefill_tokens <= new_tokens + 12, (second.prefill_tokens, new_tokens)


def test_context_policy_drops_oldest_turns(smol_path):
    rt = Runtime(make_backend(smol_path, n_ctx=256), "smollm2-135m")
    sess = rt.session(system="Reply briefly.")
    for i in range(8):
        reply = "".join(sess.send(f"Turn {i}: tell me something about the number {i}.", max_tokens=48))
        assert sess.last_stats.finish_reason in ("eos", "length", "context")
        assert reply and sess.messages[-1] == {"role": "assistant", "content": reply}
    assert sess.dropped > 0
    assert sess.messages[0]["role"] == "system"
    assert len(rt.backend.cached) <= 256
    with pytest.raises(PromptTooLongError):
        "".join(sess.send("word " * 400, max_tokens=8))
    assert sess.messages[-1]["role"] == "assistant"  # the refused question left no trace
    rt.close()


def test_prompt_too_long_raw(rt_small):
    with pytest.raises(PromptTooLongError):
        rt_small.generate("hello " * 3000, max_tokens=4)


def test_bad_parameters():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_probs_top_k_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = probs(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    p = probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8 <= 0.85
    np.testing.assert_allclose(p, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    p = probs(logits, SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(p, [1, 0, 0, 0, 0])
