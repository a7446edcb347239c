"""MLX backend on the CPU build: conversion, token ids, parity with llama.cpp, trees, commit and rollback.

MLX on this CPU multiplies matrices without a fast BLAS (~0.15 s/token for smollm2-135m, ~0.5 s/token
for qwen2.5-coder-0.5b), so sequences are short and the converted models are cached on disk.
"""

import gc
import json
import math
import types

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from edgespec.backends import convert  # noqa: E402
from edgespec.backends.base import BackendError, ContextFullError, detokenize  # noqa: E402
from edgespec.backends.mlx_backend import MlxBackend  # noqa: E402
from tests.conftest import QWEN, SMALL, make_backend  # noqa: E402

MODE = "gguf"  # the default: llama.cpp's own codes, transcribed
# teacher-forced tokens: smollm2 (~0.11 s a token here) carries the statistics; qwen (~0.6 s a token) checks its
# architecture (biases, NEOX rope, tied head, its mix of quant types) over as many positions as before the suite was
# sped up (its first 95 positions agreed 100%, docs/bench/history.md)
PARITY_TOKENS = {SMALL: 256, QWEN: 96}
NEAR_TIE = 0.75  # top-2 logit margin below which llama.cpp's own batched and one-token decodes may disagree

TEXTS = [
    "Hello, world! def f(x): return x ** 2",
    "naïve café — 日本語のテキスト, emoji 🙂🚀👍🏽 and Ελληνικά, Ünïcödé",
    "  leading spaces\n\ttabs\nand a trailing newline\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "x" * 50 + " 1234567890 3.14159 0xDEADBEEF",
]

PARITY_TEXT = '''import os
from pathlib import Path


def find_files(root, suffix=".py"):
    """Yield every file under ``root`` whose name ends with ``suffix``, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffix):
                found.append(Path(dirpath) / name)
    return found


class Counter:
    """Count how often each word occurs in a text."""

    def __init__(self):
        self.counts = {}

    def add(self, text):
        for word in text.lower().split():
            word = word.strip(".,;:!?")
            if word:
                self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, n=10):
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


The history of computing is a story of people trying to make machines do arithmetic faster and more
reliably. Early mechanical calculators could add and subtract, and later ones could multiply. In the
nineteenth century, Charles Babbage designed an analytical engine that could be programmed with punched
cards, and Ada Lovelace wrote what many consider the first program for it.
'''


def chain(n):
    return [-1] + list(range(n - 1))


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def smol_mlx(smol_path):
    b = MlxBackend(smol_path, n_ctx=1024, bits=MODE, progress=False)
    yield b
    b.close()


@pytest.fixture(scope="module", params=[SMALL, QWEN])
def pair(request, qwen_path):
    """(llama.cpp backend, MLX backend) on the same GGUF: the module's llama.cpp backend (each test empties its
    cache before use) and an MLX backend for the module (smollm2's is ``smol_mlx``, loaded once)."""
    if request.param == SMALL:
        yield SMALL, request.getfixturevalue("smol_backend"), request.getfixturevalue("smol_mlx")
        return
    ref = request.getfixturevalue("qwen_backend")
    mb = MlxBackend(qwen_path, n_ctx=1024, bits=MODE, progress=False)
    yield QWEN, ref, mb
    mb.close()


# ---- conversion ---------------------------------------------------------------------------------
def test_conversion_is_cached_and_complete(smol_path, smol_mlx):
    folder = convert.mlx_dir(smol_path, MODE)
    assert smol_mlx.mlx_path == folder
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert.convert(smol_path, bits=MODE, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # converted once
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["rope_traditional"] is True
    assert cfg["num_hidden_layers"] == smol_mlx.info.n_layer == 30
    assert not any(p.name.startswith(folder.name + ".tmp") for p in folder.parent.iterdir())


def test_conversion_names():
    assert convert.mlx_name("blk.3.attn_q.bias", "qwen2") == "model.layers.3.self_attn.q_proj.bias"
    assert convert.mlx_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert convert.mlx_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert convert.mlx_name("output.weight", "qwen2") == "lm_head.weight"
    with pytest.raises(convert.ConvertError):
        convert.mlx_name("blk.0.mystery.weight", "llama")
    assert [convert.mode(b) for b in (4, "8", None, "none", "gguf")] == ["q4", "q8", "f16", "f16", "gguf"]
    with pytest.raises(convert.ConvertError):
        convert.mode(3)


def _random_blocks(qtype, rows=8, cols=512, seed=0):
    """Random bytes are valid blocks of every GGUF quant type; only the float16 scales need sane values."""
    from gguf.quants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(len(raw), 2)).astype(np.float16).view(np.uint8)
    if qtype.name == "Q6_K":
        raw[:, -2:] = scales[:, :2]  # d is at the end
    else:
        raw[:, :4] = scales  # d (and m / dmin) first
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name,bits", [("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 5), ("Q5_1", 5), ("Q8_0", 8),
                                       ("Q4_K", 4), ("Q5_K", 5), ("Q6_K", None)])
def test_transcription_of_block_types(name, bits):
    """Affine block types become MLX codes of the same width, equal up to float16 scales and biases."""
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType[name]
    data = _random_blocks(qtype)
    w = dequantize(data, qtype)
    res = convert.transcribe(types.SimpleNamespace(data=data, tensor_type=qtype), w)
    if bits is None:  # Q6_K: 16-weight sub-blocks with their own scales
        assert res is None
        return
    packed, scales, biases, got = res
    assert got == bits and packed.dtype == np.uint32 and packed.shape == (w.shape[0], w.shape[1] * bits // 32)
    back = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    err = np.abs(np.array(back.astype(mx.float32)) - w).max() / np.abs(w).max()
    assert err < 2e-3, err


def test_transcription_of_real_tensors():
    """The qwen GGUF mixes Q4_K, Q5_0, Q8_0 and Q6_K (the last is re-quantized, not transcribed)."""
    import gguf
    from gguf.quants import dequantize

    from edgespec import registry
    from edgespec.gguf_header import read_header

    path = registry.resolve(QWEN)
    types_ = {"Q4_K", "Q5_0", "Q8_0", "Q6_K"}
    seen = {}
    # the header read by edgespec's reader (gguf.GGUFReader spends seconds on qwen's 152k-token vocabulary), the
    # data mapped from the file as GGUFReader maps it: [rows, bytes per row]
    for t in sorted(read_header(path).tensors, key=lambda t: math.prod(t.shape)):  # the smallest tensor of each type
        name = gguf.GGMLQuantizationType(t.type).name
        if name in types_ and name not in seen and len(t.shape) == 2:
            seen[name] = t
    assert set(seen) == types_
    for name, t in seen.items():
        qtype = gguf.GGMLQuantizationType(t.type)
        cols, rows = t.shape
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(rows, t.n_bytes // rows))
        w = dequantize(data, qtype).reshape(rows, cols)
        res = convert.transcribe(types.SimpleNamespace(data=data, tensor_type=qtype), w)
        if name == "Q6_K":  # 16-weight sub-blocks with their own scales
            assert res is None
            continue
        packed, scales, biases, bits = res
        assert bits == {"Q4_K": 4, "Q5_0": 5, "Q8_0": 8}[name]
        back = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
        err = np.abs(np.array(back.astype(mx.float32)) - w).max() / np.abs(w).max()
        assert err < 2e-3, (name, err)


# ---- tokens and metadata ------------------------------------------------------------------------
def test_tokens_and_info_match_llama_cpp(pair):
    _, ref, mb = pair
    for text in TEXTS:
        for add_special in (True, False):
            assert mb.tokenize(text, add_special) == ref.tokenize(text, add_special), text
        toks = mb.tokenize(text, add_special=False)
        assert [mb.token_bytes(t) for t in toks] == [ref.token_bytes(t) for t in toks]
        assert detokenize(mb, [t for t in toks if mb.token_bytes(t)]) == detokenize(ref, toks)
    a, b = ref.info, mb.info
    for f in ("arch", "n_layer", "n_embd", "n_head", "n_head_kv", "n_vocab", "bos", "eog", "add_bos",
              "chat_template", "bos_text", "eos_text"):
        assert getattr(a, f) == getattr(b, f), f


# ---- parity -------------------------------------------------------------------------------------
def teacher_forced(ref, mb, toks):
    """Both backends on ``toks`` (one prefill token, then one batch): per position, whether the top-1
    tokens agree, whether llama.cpp's top-2 margin is a near-tie, and |d log-prob| of the next token."""
    ref.truncate(0)
    mb.truncate(0)
    ref.prefill(toks[:1])
    mb.prefill(toks[:1])
    a = ref.forward(toks[1:-1], chain(len(toks) - 2)).logits
    b = mb.forward(toks[1:-1], chain(len(toks) - 2)).logits
    n = len(a)
    target = np.array(toks[2:])
    same = a.argmax(1) == b.argmax(1)
    top2 = np.sort(a, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) < NEAR_TIE
    dlp = np.abs(log_softmax(a)[np.arange(n), target] - log_softmax(b)[np.arange(n), target])
    return same, near_tie, dlp


def test_teacher_forced_parity_with_llama_cpp(pair):
    """Top-1 agreement >= 97% and close log-probs of the reference tokens, over one teacher-forced batch.

    llama.cpp quantizes activations to 8 bits in its matmuls; its own batched and one-token decodes
    agree on only 94-96.5% of top-1 tokens on smollm2 (mean |d logprob| 0.05-0.07; qwen 0.5B: 98-99%,
    0.03-0.04). So a disagreement counts against the 97% only where llama.cpp's top-2 margin is at
    least NEAR_TIE; the raw figure is printed, and must stay >= 93%.
    """
    name, ref, mb = pair
    same, near_tie, dlp = teacher_forced(ref, mb, ref.tokenize(PARITY_TEXT)[:PARITY_TOKENS[name] + 1])
    print(f"{name}: {len(same)} tokens, top-1 agreement {same.mean():.4f} raw, {(same | near_tie).mean():.4f} "
          f"excusing near-ties ({int((~same & near_tie).sum())}), mean |d logprob| {dlp.mean():.4f}, "
          f"max {dlp.max():.3f}")
    assert (same | near_tie).mean() >= 0.97
    assert same.mean() >= 0.93
    assert dlp.mean() < 0.1
    assert np.median(dlp) < 0.05


# ---- trees, commit, rollback --------------------------------------------------------------------
def _prompt(b):
    b.truncate(0)
    toks = b.tokenize("def fibonacci(n):\n    ", add_special=True)
    b.prefill(toks)
    return toks


def _close(x, y, tol):
    assert np.abs(x - y).max() <= tol * max(1.0, np.abs(y).max()), np.abs(x - y).max()


def test_tree_forward_equals_chain_per_branch(pair):
    _, _, b = pair
    t = b.tokenize(" if n < 2: return", add_special=False)
    tokens = [t[0], t[1], t[2], t[3], t[4]]
    parents = [-1, 0, 0, 1, -1]  # branches: 0-1-3, 0-2, 4
    prompt = _prompt(b)
    tree = b.forward(tokens, parents)
    for branch in ([0, 1, 3], [0, 2], [4]):
        one = b.forward([tokens[i] for i in branch], chain(len(branch)))
        _close(tree.logits[branch], one.logits, 2e-3)
        _close(tree.hidden[branch], one.hidden, 2e-3)
        assert (tree.logits[branch].argmax(1) == one.logits.argmax(1)).all()
    assert b.cached == prompt  # nothing committed


@pytest.mark.parametrize("path", [[0, 2], [0, 1, 3], [4], []])
def test_commit_keeps_the_path(smol_mlx, path):
    b = smol_mlx
    t = b.tokenize(" if n < 2: return n", add_special=False)
    tokens, parents = t[:5], [-1, 0, 0, 1, -1]
    prompt = _prompt(b)
    b.forward(tokens, parents)
    b.commit(path)
    kept = [tokens[i] for i in path]
    assert b.cached == prompt + kept
    nxt = b.forward(t[5:7], chain(2))
    b.truncate(len(prompt))
    fresh = b.forward(kept + t[5:7], chain(len(kept) + 2))
    _close(nxt.logits, fresh.logits[len(kept):], 2e-3)
    _close(nxt.hidden, fresh.hidden[len(kept):], 2e-3)


def test_rollback_then_reevaluate_matches(pair):
    _, _, b = pair
    prompt = _prompt(b)
    x = b.tokenize(" if n < 2:", add_special=False)
    y = b.tokenize(" return n\n", add_special=False)
    first = b.forward(x, chain(len(x)))
    b.commit(list(range(len(x))))
    b.forward(y, chain(len(y)))
    b.commit(list(range(len(y))))
    assert len(b.cached) == len(prompt) + len(x) + len(y)
    b.truncate(len(prompt))
    again = b.forward(x, chain(len(x)))
    np.testing.assert_allclose(again.logits, first.logits, atol=1e-4)
    np.testing.assert_allclose(again.hidden, first.hidden, atol=1e-4)
    b.commit(list(range(len(x))))
    k = len(prompt) + 1  # cut inside x, then evaluate the rest of x again
    b.truncate(k)
    rest = b.forward(x[1:], chain(len(x) - 1))
    _close(rest.logits, first.logits[1:], 1e-3)


def test_uncommitted_tree_is_dropped(smol_mlx):
    b = smol_mlx
    t = b.tokenize(" while True:\n        n -= 1", add_special=False)
    prompt = _prompt(b)
    clean = b.forward(t[:2], chain(2)).logits
    b.forward(t[2:5], [-1, -1, 0])  # a tree left pending
    again = b.forward(t[:2], chain(2)).logits  # replaces it
    np.testing.assert_allclose(again, clean, atol=1e-4)
    b.truncate(len(prompt))
    assert b.cached == prompt


def test_prefill_in_chunks_and_errors(smol_path, smol_mlx):
    b = smol_mlx
    toks = b.tokenize(PARITY_TEXT)[:20]  # 20 tokens: 3 chunks of 8
    b.truncate(0)
    whole = b.prefill(toks)
    before = mx.get_memory_limit()
    small = MlxBackend(smol_path, n_ctx=24, bits=MODE, n_batch=8, memory_limit=3 << 30, progress=False)
    try:
        assert mx.get_memory_limit() == 3 << 30 == small.memory().extra["memory_limit"]
        parts = small.prefill(toks)
        assert small.cached == toks
        _close(parts.logits, whole.logits, 2e-3)
        with pytest.raises(ContextFullError):
            small.forward(toks[:6], chain(6))  # 20 + 6 > 24 (and 6 <= n_batch)
        with pytest.raises(BackendError):
            small.commit([0])
        with pytest.raises(BackendError):
            small.truncate(len(toks) + 1)
        small.forward(toks[:3], [-1, 0, 0])
        with pytest.raises(BackendError):
            small.commit([0, 2, 1])
    finally:
        small.close()
    assert mx.get_memory_limit() == before


def test_memory_figures(smol_path):
    """On a backend of its own, so that its KV cache is first allocated by the prefill measured here."""
    gc.collect()  # nothing from earlier tests is freed while the figures are read
    b = MlxBackend(smol_path, n_ctx=1024, bits=MODE, progress=False)
    try:
        mx.reset_peak_memory()
        before = b.memory().extra
        assert before["kv_allocated_bytes"] == 0
        _prompt(b)
        m = b.memory()
        cfg = b.config
        head_dim = cfg["head_dim"]
        assert m.kv_bytes_per_token == cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * 4
        assert m.n_cached == len(b.cached) and m.n_ctx == b.n_ctx
        assert m.weights_bytes > 100e6
        assert m.extra["active_bytes"] >= m.weights_bytes
        assert m.extra["kv_allocated_bytes"] >= m.kv_used_bytes
        # the peak is a peak, not the current figure: the prefill's temporaries are freed again, the peak keeps
        # them; and what stays is the KV cache the prefill allocated
        after = m.extra
        assert after["peak_bytes"] > after["active_bytes"]
        assert after["kv_allocated_bytes"] > before["kv_allocated_bytes"]
        assert (after["active_bytes"] - before["active_bytes"]
                >= after["kv_allocated_bytes"] - before["kv_allocated_bytes"])
    finally:
        b.close()


# ---- speculative decoding on MLX ----------------------------------------------------------------
def test_greedy_speculative_equals_plain(smol_mlx):
    from edgespec.controller import Controller, ControllerConfig
    from edgespec.generate import GenerationConfig, Stats, stream
    from edgespec.models.drafting.ngram import NgramDrafter
    from edgespec.speculative import speculative_steps

    b = smol_mlx
    prompt = b.tokenize("1, 2, 3, 4, 5, 1, 2, 3,")  # short: each prompt token costs ~0.15 s here, twice

    def run(steps=None):
        b.truncate(0)
        out, stats = [], Stats()
        kw = {"steps": steps} if steps else {}
        text = "".join(stream(b, prompt, GenerationConfig(max_tokens=16), stats, out_tokens=out, **kw))
        return out, text, stats

    plain, plain_text, _ = run()
    ctl = Controller(ControllerConfig(fixed_depth=3, width=1, max_nodes=8))
    spec, spec_text, st = run(speculative_steps(NgramDrafter(), ctl))
    assert st.accepted > 0
    if spec != plain:  # a chain verify batches tokens: allowed only at a near-tie of plain decoding
        i = next(k for k, (p, s) in enumerate(zip(plain, spec, strict=False)) if p != s)
        b.truncate(0)
        top = np.sort(b.prefill(prompt + plain[:i]).logits[0])[-2:]
        assert top[1] - top[0] < NEAR_TIE, f"divergence at {i} is not a near-tie"
    else:
        assert spec_text == plain_text


# ---- other weight modes and architectures -------------------------------------------------------
def _short_parity(ref, mb, n=32):
    same, near_tie, dlp = teacher_forced(ref, mb, ref.tokenize(PARITY_TEXT)[:n])
    return (same | near_tie).mean(), dlp.mean()


def test_requantized_8bit_mode(smol_path, smol):
    mb = MlxBackend(smol_path, n_ctx=256, bits=8, progress=False)
    try:
        assert mb.mlx_path.name.endswith("-q8")
        assert mb.config["quantization"] == {"group_size": 64, "bits": 8}
        agree, dlp = _short_parity(smol, mb)
        assert agree >= 0.9 and dlp < 0.15
    finally:
        mb.close()


def test_gemma3_sentencepiece_model():
    """gemma3 (SentencePiece vocab, sliding-window layers, 1 + w norms), when its GGUF is already local."""
    from edgespec import registry

    try:
        path = registry.resolve("gemma-3-270m", download=False)
    except registry.ModelError:
        pytest.skip("gemma-3-270m is not downloaded")
    ref = make_backend(path, n_ctx=256)
    mb = MlxBackend(path, n_ctx=256, bits=MODE, progress=False)
    try:
        for text in TEXTS:
            assert mb.tokenize(text) == ref.tokenize(text)
        assert mb.config["sliding_window_pattern"] == 6
        agree, dlp = _short_parity(ref, mb)
        assert agree >= 0.9 and dlp < 0.2
    finally:
        mb.close()
        ref.close()
