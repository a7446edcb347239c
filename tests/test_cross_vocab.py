"""Cross-vocabulary drafting: translation both ways, greedy exactness, sampling losslessness, bounded cache."""

import numpy as np
import pytest

from edgespec.controller import controller_for
from edgespec.generate import GenerationConfig, Stats, plain_steps, stream
from edgespec.models.drafting.cross_vocab import CrossVocabDrafter, DraftText, Translator, vocab_bytes
from edgespec.models.drafting.drafter import DraftContext, TreeShape
from edgespec.sampling import SamplingParams, probs
from edgespec.speculative import accept_sampling, speculative_steps
from tests.conftest import make_backend

CRAFTED = [
    "def add(a, b):\n    return a + b\n",
    "naïve café — déjà vu, 日本語のテキスト, 한국어, emoji 🙂🚀 done",
    "    for i in range(10):\n        print(f\"{i:>4}\")  # tabs\tand spaces\n",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx aaaaaa 1234567890 !!!???",
]


@pytest.fixture(scope="module")
def vocabs(smol_backend, qwen_backend):
    return vocab_bytes(smol_backend), vocab_bytes(qwen_backend)


@pytest.mark.parametrize("text", CRAFTED)
def test_translation_round_trips(smol, qwen, vocabs, text):
    tr = Translator(*vocabs)
    dt = DraftText(smol, qwen, tr)
    target = qwen.tokenize(text, add_special=False)
    # target -> draft, fed one target token at a time (as decoding does), with a rollback in the middle
    for i in range(1, len(target) + 1):
        dt.update(target[:i])
    dt.update(target[: len(target) // 2])
    draft = dt.update(target)
    assert b"".join(smol.token_bytes(d) for d in draft) == text.encode()  # the same text, exactly
    # draft -> target: after learning from this text, the draft tokens translate back to target tokens
    # that spell exactly the same text (the target may still have tokenized it differently, e.g. "):\n")
    back = tr.translate(draft)
    assert sum(n for _, n in back) == len(draft)
    assert b"".join(qwen.token_bytes(t) for t, _ in back) == text.encode()
    same = sum(a == b for (a, _), b in zip(back, target, strict=False))
    assert same >= 0.5 * len(target)
    if any(ord(c) > 127 for c in text):
        assert any(n > 1 for _, n in back)  # multi-byte characters needed merged runs


def test_cache_is_bounded_and_reports_its_size(smol, qwen, vocabs):
    tr = Translator(*vocabs, capacity=8)
    dt = DraftText(smol, qwen, tr)
    dt.update(qwen.tokenize(" ".join(CRAFTED) * 2, add_special=False))
    assert len(tr.cache) == 8 and tr.evictions > 0
    assert tr.nbytes() == tr.direct.nbytes + 150 * 8


def _generate(backend, prompt, drafter=None, n=40, sp=None):
    backend.truncate(0)
    stats, out = Stats(), []
    # chains of 2 drafts: 3-row batches are bit-identical to single decodes (4+ rows may move near-ties)
    ctl = controller_for(drafter, width=1, fixed_depth=2) if drafter is not None else None
    steps = plain_steps if drafter is None else speculative_steps(drafter, ctl)
    cfg = GenerationConfig(max_tokens=n, sampling=sp or SamplingParams())
    list(stream(backend, prompt, cfg, stats, steps=steps, out_tokens=out))
    return out, stats


def test_cross_vocab_greedy_is_exact(qwen, smol_path):
    draft = make_backend(smol_path, n_ctx=1024)
    xd = CrossVocabDrafter(draft, qwen)
    accepted = 0
    try:
        for text in ["def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n",
                     "The capital of France is Paris. The capital of Japan is"]:
            prompt = qwen.tokenize(text)
            plain, _ = _generate(qwen, prompt)
            spec, st = _generate(qwen, prompt, xd)
            assert spec == plain
            accepted += st.accepted
        assert accepted > 0 and xd.stats["proposed"] > 0
        assert xd.footprint()["cache_entries"] == len(xd.translator.cache)
        # a node no path can pay for: nothing is drafted, and the empty tree is well formed
        empty = xd.propose(DraftContext(prompt, prompt[-1], None, None), TreeShape(3, 1, 8, node_cost=(2.0,) * 8))
        assert empty.tokens == [] and empty.parents == []
    finally:
        xd.close()


def test_intersection_sampling_is_lossless(qwen, smol_path):
    """q from the real drafter (the intersection rule) with the real target's p: the first token's
    distribution after rejection sampling equals p; a rule that ignores p fails the same check."""
    draft = make_backend(smol_path, n_ctx=512)
    xd = CrossVocabDrafter(draft, qwen)
    try:
        prompt = qwen.tokenize("My favourite fruit is the")
        qwen.truncate(0)
        logits = qwen.prefill(prompt[:-1]).logits[0]
        ctx = DraftContext(prompt[:-1], prompt[-1], None, logits, sampling=True)
        tree = xd.propose(ctx, TreeShape(1, 1, 4))
        q = tree.q[0]
        assert abs(q.sum() - 1) < 1e-6 and q[tree.tokens[0]] > 0
        shared = set(xd.translator.direct[xd.translator.direct >= 0].tolist())
        assert set(np.flatnonzero(q).tolist()) <= shared  # only tokens both vocabularies spell
        row = qwen.forward([prompt[-1]], [-1]).logits[0]
        qwen.truncate(0)
    finally:
        xd.close()
    sp = SamplingParams(temperature=1.0, top_k=12)
    # The rule runs on p's support plus one outcome for every other token: outside p's support (p = 0) a draft is
    # always rejected and the same residual of p is sampled, whichever token it was, so those tokens are drawn as
    # one, with their total q. The outcome distribution and both TV figures are those of the full vocabulary, at
    # microseconds per trial instead of milliseconds (151,936-token rows).
    keep = np.flatnonzero(probs(row, sp))
    others = np.ones(len(row), dtype=bool)
    others[keep] = False
    small = np.append(row[keep], row[others].max())  # below the top-k threshold: p = 0 there too
    q = np.append(q[keep], q[others].sum())
    q /= q.sum()
    target_logits = np.stack([small, small])
    p = probs(small, sp)
    assert p[-1] == 0 and np.allclose(p[:-1], probs(row, sp)[keep])
    rng = np.random.default_rng(0)
    n = 8000  # TV sampling noise over 12 tokens at this n is about 0.015

    def freqs(rule):
        counts = {}
        for _ in range(n):
            x = int(rng.choice(len(q), p=q))
            t = type(tree)([x], [-1], [q])
            acc, nxt = rule(t, target_logits, sp, rng)
            first = x if acc else nxt
            counts[first] = counts.get(first, 0) + 1
        return counts

    def tv(counts):
        keys = set(counts) | set(np.flatnonzero(p).tolist())
        return 0.5 * sum(abs(counts.get(k, 0) / n - p[k]) for k in keys)

    assert tv(freqs(accept_sampling)) < 0.035
    assert tv(freqs(lambda t, lg, s, r: ([0], 0))) > 0.1  # always accept the draft: not lossless
