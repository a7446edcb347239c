"""llama.cpp backend: tokens, tree forward, rollback, hidden states, and a reference against llama-cpp-python."""

import os

import numpy as np
import pytest

from edgespec.backends.base import BackendError, StreamDecoder, detokenize

TEXTS = [
    "Hello, world! def f(x): return x ** 2",
    "naïve café — 日本語のテキスト, emoji 🙂🚀 and Ελληνικά",
    "  leading spaces\n\ttabs\nand a trailing newline\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_roundtrip_multibyte(backend, text):
    toks = backend.tokenize(text, add_special=False)
    assert toks, "tokenizer returned nothing"
    assert detokenize(backend, toks) == text


def test_stream_decoder_holds_partial_utf8(backend):
    text = "日本🙂"
    toks = backend.tokenize(text, add_special=False)
    dec = StreamDecoder(backend)
    pieces = [dec.push(t) for t in toks] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces), pieces  # no broken characters mid-stream


def _prompt(b):
    b.truncate(0)
    toks = b.tokenize("def fibonacci(n):\n    ", add_special=True)
    b.prefill(toks)
    return toks


def test_rollback_then_reevaluate_matches(backend):
    b = backend
    prompt = _prompt(b)
    x = b.tokenize(" if n < 2:", add_special=False)
    first = b.forward(x, [-1] + list(range(len(x) - 1)))
    b.commit(list(range(len(x))))
    y = b.tokenize(" return n\n", add_special=False)
    b.forward(y, [-1] + list(range(len(y) - 1)))
    b.commit(list(range(len(y))))
    assert len(b.cached) == len(prompt) + len(x) + len(y)
    b.truncate(len(prompt))
    again = b.forward(x, [-1] + list(range(len(x) - 1)))
    np.testing.assert_allclose(again.logits, first.logits, atol=1e-4)
    np.testing.assert_allclose(again.hidden, first.hidden, atol=1e-4)


def test_uncommitted_tree_is_discarded(backend):
    b = backend
    prompt = _prompt(b)
    ref = b.forward([1234], [-1])
    b.truncate(len(prompt))
    b.forward([11, 12, 13, 14], [-1, 0, 0, 1])  # never committed
    again = b.forward([1234], [-1])  # implicitly drops the pending tree first
    np.testing.assert_allclose(again.logits, ref.logits, atol=1e-4)


def test_tree_forward_equals_chains(backend):
    """Each branch of a tree gets the logits of that branch evaluated alone as a chain.

    llama.cpp picks its matmul kernel by batch size, so the chains are padded with an unrelated
    node to the tree's size; with the same kernels the results must agree bit for bit.
    """
    b = backend
    prompt = _prompt(b)
    a, bb, c, d = b.tokenize(" if n <= 1", add_special=False)[:4]
    pad = b.tokenize(" pad", add_special=False)[0]
    tree = b.forward([a, bb, c, d], [-1, 0, 0, 1])  # a -> b -> d, a -> c
    b.truncate(len(prompt))
    chain1 = b.forward([a, bb, d, pad], [-1, 0, 1, -1])
    b.truncate(len(prompt))
    chain2 = b.forward([a, c, pad, pad], [-1, 0, -1, -1])
    b.truncate(len(prompt))
    wrong = b.forward([a, bb, c, pad], [-1, 0, 1, -1])  # c wrongly after b
    b.truncate(len(prompt))
    tol = dict(atol=1e-5, rtol=0)
    np.testing.assert_allclose(tree.logits[[0, 1, 3]], chain1.logits[:3], **tol)
    np.testing.assert_allclose(tree.logits[[0, 2]], chain2.logits[:2], **tol)
    np.testing.assert_allclose(tree.hidden[[0, 2]], chain2.hidden[:2], **tol)
    assert np.abs(tree.logits[2] - wrong.logits[2]).max() > 0.5  # the mask matters


def test_commit_branch_keeps_only_that_branch(backend):
    """After committing branch a -> c, the next token sees exactly prompt + a + c.

    The reference is built with the same cache layout (the dropped node leaves a hole that the next
    token fills; a different layout changes only the float summation order), so it must match exactly,
    while keeping the wrong branch must not.
    """
    b = backend
    prompt = _prompt(b)
    t = b.tokenize(" if n <= 1 return", add_special=False)[:4]
    b.forward(t, [-1, 0, 0, 1])
    b.commit([0, 2])  # keep a -> c
    assert b.cached == prompt + [t[0], t[2]]
    after = b.forward([t[3]], [-1])
    b.truncate(len(prompt))
    b.forward([t[0], t[1], t[2], t[1]], [-1, 0, 0, -1])  # c alone after a, same batch and layout
    b.commit([0, 2])
    ref = b.forward([t[3]], [-1])
    b.truncate(len(prompt))
    b.forward([t[0], t[1], t[2], t[1]], [-1, 0, 0, -1])
    b.commit([0, 1])  # the other branch
    wrong = b.forward([t[3]], [-1])
    b.truncate(len(prompt))
    np.testing.assert_allclose(after.logits, ref.logits, atol=1e-5)
    assert np.abs(after.logits - wrong.logits).max() > 1.0


def test_hidden_states_shape_and_per_position(backend):
    b = backend
    _prompt(b)
    toks = b.tokenize(" return fibonacci(n - 1)", add_special=False)
    out = b.forward(toks, [-1] + list(range(len(toks) - 1)))
    assert out.hidden.shape == (len(toks), b.info.n_embd)
    assert out.logits.shape == (len(toks), b.info.n_vocab)
    assert np.isfinite(out.hidden).all()
    for i in range(len(toks) - 1):
        assert not np.allclose(out.hidden[i], out.hidden[i + 1])


def test_hidden_is_post_final_norm_lm_head_input(smol, smol_path):
    """logits == hidden @ W_out^T for the tied embedding matrix: the hidden state is the LM head's input."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(smol_path)
    t = {x.name: x for x in r.tensors}
    w = t.get("output.weight") or t["token_embd.weight"]
    W = dequantize(w.data, w.tensor_type).reshape(smol.info.n_vocab, smol.info.n_embd)
    _prompt(smol)
    out = smol.forward([28, 29, 30], [-1, 0, 1])
    approx = out.hidden @ W.T
    assert np.corrcoef(approx[0], out.logits[0])[0, 1] > 0.999
    assert np.abs(approx - out.logits).max() < 0.05 * np.abs(out.logits).max()


def test_bad_tree_and_context_errors(smol):
    _prompt(smol)
    with pytest.raises(BackendError):
        smol.forward([1, 2], [-1, 5])  # parent after child
    with pytest.raises(BackendError):
        smol.commit([1])  # nothing pending (the bad forward was refused)
    with pytest.raises(BackendError):
        smol.truncate(10_000)


def test_memory_figures(qwen):
    m = qwen.memory()
    # qwen2.5-coder-0.5b: 24 layers, 2 KV heads of dim 64, K and V in f16
    assert m.kv_bytes_per_token == 24 * 2 * 64 * 2 * 2
    assert 300e6 < m.weights_bytes < 520e6
    assert qwen.info.n_layer == 24 and qwen.info.n_embd == 896 and qwen.info.n_vocab == 151936


def test_huge_pages_hold_the_weights_and_change_no_logits(smol_path, monkeypatch):
    """Huge pages are a page-size change only: the backend's outputs stay bit-identical, and where the kernel
    can collapse pages (Linux with THP not ``never``) the weights end up in them."""
    from conftest import make_backend

    from edgespec.backends import hugepages

    small = make_backend(smol_path, huge_pages=False)
    huge = make_backend(smol_path, huge_pages=True)
    try:
        assert small.huge_pages is None
        if hugepages.enabled(True):
            assert huge.huge_pages is not None and huge.huge_pages.bytes >= 64 << 20, huge.huge_pages
            assert hugepages.anon_huge_bytes() >= huge.huge_pages.bytes
        else:
            assert huge.huge_pages is None
        for b in (small, huge):
            b.truncate(0)
        toks = small.tokenize("def fibonacci(n):\n    ", add_special=True)
        outs = [b.prefill(toks).logits[-1] for b in (small, huge)]
        assert np.array_equal(outs[0], outs[1])
        rows = [b.forward([toks[-1], 42, 7], [-1, 0, 1], want_hidden=False).logits for b in (small, huge)]
        assert np.array_equal(rows[0], rows[1])
    finally:
        small.close()
        huge.close()
    monkeypatch.setenv("EDGESPEC_HUGE_PAGES", "0")
    assert not hugepages.enabled(None) and not hugepages.enabled(False)


EXACT_DIFFS = """
import json, os, sys
os.sched_setaffinity(0, range(os.cpu_count())) if hasattr(os, "sched_setaffinity") else None
import numpy as np
from edgespec.backends.llama_cpp import EXACT_AMX_ROWS, EXACT_CPU_ROWS, LlamaCppBackend, amx_build

b = LlamaCppBackend(sys.argv[1], n_ctx=2048, n_threads=2)
text = b.tokenize("def fibonacci(n):\\n    return n\\n" * 60, add_special=True)
toks = b.tokenize(" a = fibonacci(10) + fibonacci(11) - fibonacci(12) * 3", add_special=False)[:8]
sizes = [n for n in (2, 3, 4, 8) if n <= b.exact_rows]

def chain(ts):
    out = b.forward(ts, [-1] + list(range(len(ts) - 1)), want_hidden=False)
    b.commit(list(range(len(ts))))
    return out.logits.copy()

def diffs(n_ctx, sizes):
    b.truncate(0)
    b.prefill(text[:n_ctx])
    single = [chain([t])[0] for t in toks[:max(sizes)]]
    out = []
    for n in sizes:
        b.truncate(n_ctx)
        got = chain(toks[:n])
        out.append(max(float(np.abs(got[j] - single[j]).max()) for j in range(n)))
    b.truncate(0)
    return out

rows = EXACT_AMX_ROWS if amx_build() else EXACT_CPU_ROWS
print(json.dumps({"threads": b.n_threads, "rows": b.exact_rows, "want_rows": rows, "context": b.exact_context,
                  "below": diffs(b.exact_context - 16, sizes), "past": diffs(b.exact_context + 40, [2, 3])}))
"""


def test_batches_are_bit_exact_only_below_the_exact_context(qwen_path):
    """Why ``exact_rows`` and ``exact_context`` are what they are: with the context under ``exact_context``, each row
    of a chain of up to ``exact_rows`` rows has the logits of a single-token decode bit for bit (3 rows with the
    default build, 32 with AMX); past it, single-token decoding runs llama.cpp's split-KV attention and a 2-row
    chain no longer matches it (if that starts to pass, llama.cpp changed: re-measure the limit). The split needs
    two threads, so this runs in a child on every CPU (the test workers are pinned to one each)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", EXACT_DIFFS, str(qwen_path)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["threads"] == 2 and out["rows"] == out["want_rows"] and out["context"] == 256
    assert out["below"] == [0.0] * len(out["below"])
    assert min(out["past"]) > 0.01
