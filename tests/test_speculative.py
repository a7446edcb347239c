"""Speculative decoding: greedy exactness, sampling losslessness, stop/EOS edges, rollback consistency."""

import numpy as np
import pytest

from edgespec.controller import Controller, ControllerConfig
from edgespec.generate import GenerationConfig, Stats, plain_steps, stream
from edgespec.models.drafting.draft_model import DraftModelDrafter
from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult, pack_beams
from edgespec.models.drafting.ngram import NgramDrafter
from edgespec.sampling import PositionRng, SamplingParams, sample
from edgespec.speculative import (
    accept_greedy,
    accept_matching,
    accept_sampling,
    check_siblings_share_q,
    speculative_steps,
)
from tests.conftest import make_backend

PROMPTS = [
    "def bubble_sort(items):\n    \"\"\"Sort items in place.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8,",
]


class OracleDrafter:
    """Proposes the known greedy continuation, plus decoy siblings: exercises deep and wide trees."""

    name = "oracle"
    needs_hidden = False
    self_gating = False
    max_depth = 8
    default_width = 1

    def __init__(self, prompt, continuation, decoy=7, spoil_every=0):
        self.full = list(prompt) + list(continuation)
        self.decoy = decoy
        self.spoil_every = spoil_every
        self.calls = 0

    def reset(self):
        pass

    def propose(self, ctx, shape):
        self.calls += 1
        pos = len(ctx.cached) + 1
        if self.full[:pos - 1] != list(ctx.cached) or pos >= len(self.full):
            return DraftTree()
        good = self.full[pos:pos + shape.depth]
        if self.spoil_every and self.calls % self.spoil_every == 0 and len(good) > 1:
            good = good[:1] + [self.decoy] + good[2:]
        beams = [good] + [[self.decoy + w] + good[1:] for w in range(1, shape.width)]
        tree, _ = pack_beams(beams)
        return tree

    def observe(self, result):
        pass

    def footprint(self):
        return {"now": 0, "max": 0}


def run(backend, prompt, drafter=None, depth=None, width=1, fresh=True, **cfg):
    """Generate from ``prompt``; ``fresh``: from an empty cache, else a prompt the cache holds is not evaluated
    again (only its last token)."""
    if fresh:
        backend.truncate(0)
    stats, out = Stats(), []
    steps = plain_steps
    if drafter is not None:
        ctl = Controller(ControllerConfig(fixed_depth=depth, width=width, max_nodes=16))
        steps = speculative_steps(drafter, ctl)
    text = "".join(stream(backend, prompt, GenerationConfig(**cfg), stats, steps=steps, out_tokens=out))
    return out, text, stats


_PLAIN: dict = {}


def plain_run(backend, prompt, max_tokens):
    """Plain greedy decoding of ``prompt`` from an empty cache: (tokens, text). Deterministic, so decoded once per
    backend, prompt and length, for every test that compares with it."""
    key = (id(backend), tuple(prompt), max_tokens)
    if key not in _PLAIN:
        out, text, stats = run(backend, prompt, max_tokens=max_tokens)
        assert stats.finish_reason in ("length", "eos")
        _PLAIN[key] = (out, text)
    out, text = _PLAIN[key]
    return list(out), text


def top2_margin(backend, prompt, out, i):
    """The plain decode's top-1 minus top-2 logit before emitting out[i]."""
    backend.truncate(0)
    logits = backend.prefill(prompt + out[:i]).logits[0]
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@pytest.fixture(scope="module")
def smol_draft(smol_path):
    b = make_backend(smol_path)
    yield b
    b.close()


@pytest.mark.parametrize("depth,width", [(1, 1), (2, 1), (1, 2)])
def test_greedy_exact_small_trees(smol, depth, width):
    """Trees of at most 3 nodes verify with the same kernels as single-token decode: bit-exact output (a property
    of the kernels, not of the model: the smallest model checks it)."""
    for text in PROMPTS:
        prompt = smol.tokenize(text)
        plain, _ = plain_run(smol, prompt, 48)
        spec, _, st = run(smol, prompt, OracleDrafter(prompt, plain, spoil_every=3), depth, width, max_tokens=48)
        assert spec == plain
        assert st.accepted > 0 and st.verifies < len(plain)


@pytest.mark.parametrize("depth,width", [(4, 1), (3, 2), (2, 3)])
def test_greedy_deep_trees_equal_up_to_near_ties(qwen, depth, width):
    """Larger verify batches use other matmul kernels (logits move by up to ~0.5), so a divergence is
    allowed only where plain decoding's top-2 margin is below 0.75; none is expected here."""
    allowed = 0
    for text in PROMPTS:
        prompt = qwen.tokenize(text)
        plain, _ = plain_run(qwen, prompt, 48)
        spec, _, st = run(qwen, prompt, OracleDrafter(prompt, plain, spoil_every=3), depth, width, max_tokens=48)
        assert st.accepted > st.verifies  # the deep drafts were actually used
        if spec != plain:
            i = next(k for k, (a, b) in enumerate(zip(spec, plain, strict=False)) if a != b)
            assert top2_margin(qwen, prompt, plain, i) < 0.75, f"divergence at {i} is not a near-tie"
            allowed += 1
    assert allowed <= 1


def test_greedy_ngram_and_draft_model(smol, smol_draft):
    for text in PROMPTS:
        prompt = smol.tokenize(text)
        plain, plain_text = plain_run(smol, prompt, 40)
        ng, ng_text, st = run(smol, prompt, NgramDrafter(), depth=2, width=1, max_tokens=40)
        assert ng == plain and ng_text == plain_text
        dm = DraftModelDrafter(smol_draft, target_vocab=smol.info.n_vocab)
        spec, _, st = run(smol, prompt, dm, depth=2, max_tokens=40)
        assert spec == plain
        assert st.accepted >= 0.8 * st.drafted  # the same model drafting itself is nearly always right
        # the draft cache followed every rollback: it holds a prefix of the target's tokens
        assert smol_draft.cached == (prompt + spec)[:len(smol_draft.cached)]


def test_stop_eos_and_max_tokens_match_plain(smol):
    prompt = smol.tokenize(PROMPTS[2])
    plain, plain_text = plain_run(smol, prompt, 40)
    stop = plain_text[12:15]
    for kw in (dict(max_tokens=5), dict(max_tokens=7), dict(max_tokens=40, stop=(stop,))):
        p, pt, ps = run(smol, prompt, **kw)
        s, st_text, ss = run(smol, prompt, OracleDrafter(prompt, plain), depth=2, **kw)
        assert (s, st_text, ss.finish_reason) == (p, pt, ps.finish_reason), kw
        assert len(smol.cached) <= len(prompt) + len(s)  # nothing past the output stays cached
    # EOS inside an accepted draft: a chat turn that ends with the end-of-turn token
    chat = smol.tokenize("<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n")
    plain, _, ps = run(smol, chat, max_tokens=30)
    assert ps.finish_reason == "eos"
    eos = next(t for t in smol.info.eog if t in smol.tokenize("<|im_end|>"))
    s, _, ss = run(smol, chat, OracleDrafter(chat, plain + [eos, 11, 12]), depth=2, max_tokens=30)
    assert s == plain and ss.finish_reason == "eos"


def test_no_draft_runs_past_max_tokens(smol):
    """The remaining max_tokens caps every draft: a step yields its accepted tokens plus one, so with k tokens
    left a draft deeper than k - 1 would verify rows the request never emits."""
    prompt = smol.tokenize(PROMPTS[1])
    plain, _, _ = run(smol, prompt, max_tokens=24)
    for n in (1, 2, 5, 9):
        oracle = OracleDrafter(prompt, plain)
        depths = []
        propose = oracle.propose
        oracle.propose = lambda ctx, shape, f=propose, d=depths: (d.append((len(ctx.cached), shape.depth))
                                                                  or f(ctx, shape))
        s, _, st = run(smol, prompt, oracle, depth=8, max_tokens=n)
        assert s == plain[:n] and st.finish_reason == "length"
        for cached, depth in depths:  # emitted so far: the tokens after the prompt, plus the root
            assert depth <= n - (cached - len(prompt) + 1) - 1, (n, cached, depth)
        assert st.drafted <= max(n - 1, 0)  # a perfect drafter at depth 8 drafts exactly what is left


def test_rollback_keeps_cache_consistent(smol):
    """After speculation with rejected siblings, the cache is exactly what plain decoding leaves.

    Trees of 3 nodes use the single-token kernels, so the comparison is exact.
    """
    prompt = smol.tokenize(PROMPTS[0])
    plain, _, _ = run(smol, prompt, max_tokens=24)
    plain_next = smol.forward([plain[-1]], [-1]).logits[0]
    spec, _, st = run(smol, prompt, OracleDrafter(prompt, plain), depth=1, width=2, max_tokens=24)
    assert spec == plain and st.drafted > st.accepted > 0  # decoys were rejected and rolled back
    assert smol.cached == (prompt + spec)[:len(smol.cached)] and len(smol.cached) >= len(prompt) + len(spec) - 1
    smol.truncate(len(prompt) + len(spec) - 1)
    spec_next = smol.forward([spec[-1]], [-1]).logits[0]
    np.testing.assert_allclose(spec_next, plain_next, atol=1e-5)


# ---- sampling losslessness -----------------------------------------------------------------------
# A synthetic target whose next-token distribution depends on the output position and the token before it
# (a Markov chain), so that the exact distribution of every output position is known. Each trial runs the
# speculative loop (the target's own first token, then draft, verify with the acceptance rule, commit the
# accepted chain and the correction/bonus token, repeat) until DEPTH tokens are out, and the frequencies of
# the 1st, 2nd and 3rd tokens are compared with their exact distributions. Draft nodes are drawn from the
# q they declare (siblings without replacement from one shared q), as the rule requires.
V = 6
SP = SamplingParams(temperature=1.0)
DEPTH = 3  # output positions checked
N_TRIALS = 20000
CHI2_5DF = 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _synthetic(seed=1):
    """Target logits [position, previous token, V] and draft distributions q [position, previous token, V]
    (deliberately unlike the target)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(DEPTH + 3, V, V)) * 1.5
    q = rng.dirichlet(np.full(V, 0.7), size=(DEPTH + 3, V))
    return logits, q


def _exact_marginals(logits):
    """The target's distribution of each output position (position 0 follows token 0)."""
    dist = _softmax(logits[0][0])
    out = [dist]
    for t in range(1, DEPTH):
        dist = dist @ _softmax(logits[t])
        out.append(dist)
    return np.array(out)


def _draft(kind, q, t, prev, rng):
    """A draft continuing ``prev`` at output position ``t``, every sampled node drawn from its declared q."""
    if kind == "deterministic":  # point masses: a chain 0 -> 4 and a sibling 2
        return DraftTree([0, 2, 4], [-1, -1, 0], None)
    q1 = q[t][prev]
    x = int(rng.choice(V, p=q1))
    if kind == "chain-q":  # x ~ q1, then its child y ~ q2(.|x)
        q2 = q[t + 1][x]
        return DraftTree([x, int(rng.choice(V, p=q2))], [-1, 0], [q1, q2])
    if kind == "fixed-child":  # the second node is NOT drawn from the q it declares: breaks the rule
        return DraftTree([x, 3], [-1, 0], [q1, q[t + 1][x]])
    # "tree-q": two siblings drawn without replacement from q1, each with one child drawn from its own q
    rest = q1.copy()
    rest[x] = 0
    y = int(rng.choice(V, p=rest / rest.sum()))
    qx, qy = q[t + 1][x], q[t + 1][y]
    return DraftTree([x, y, int(rng.choice(V, p=qx)), int(rng.choice(V, p=qy))], [-1, -1, 0, 1], [q1, q1, qx, qy])


def _rows(tree, logits, t, prev):
    """The target's logits for [root] + tree: row 0 predicts position t, node i (depth d) predicts t + d."""
    depths = tree.depths()
    return np.array([logits[t][prev]] + [logits[t + d][tok] for d, tok in zip(depths, tree.tokens, strict=True)])


def _position_freqs(rule, kind, n=N_TRIALS, seed=0):
    """Frequencies of the first DEPTH output tokens over ``n`` runs of the speculative loop with ``rule``."""
    logits, q = _synthetic()
    rng = np.random.default_rng(seed)
    counts = np.zeros((DEPTH, V))
    for trial in range(n):
        prng = PositionRng(seed * N_TRIALS + trial)
        out = [sample(logits[0][0], SP, prng.at(0))]  # the target's own first token (the first root)
        while len(out) < DEPTH:
            t, prev = len(out), out[-1]
            tree = _draft(kind, q, t, prev, rng)
            accepted, nxt = rule(tree, _rows(tree, logits, t, prev), SP, prng, t)
            out += [tree.tokens[i] for i in accepted] + [nxt]
        for pos in range(DEPTH):
            counts[pos, out[pos]] += 1
    return counts / n, _exact_marginals(logits)


def _rule_for(kind):
    return accept_matching if kind == "deterministic" else accept_sampling


def _chi2(freq, p, n=N_TRIALS):
    return n * ((freq - p) ** 2 / p).sum()


@pytest.mark.parametrize("kind", ["chain-q", "tree-q", "deterministic"])
def test_sampling_is_lossless(kind):
    """The 1st, 2nd and 3rd tokens follow the target's exact distributions, with the rule the loop uses for
    each kind of tree (rejection sampling for sampled trees, the target's own sample for point masses)."""
    freq, p = _position_freqs(_rule_for(kind), kind)
    for pos in range(DEPTH):
        tv = 0.5 * np.abs(freq[pos] - p[pos]).sum()
        assert tv < 0.02, (pos, tv, freq[pos], p[pos])  # sampling noise at n=20000 is ~0.01
        assert _chi2(freq[pos], p[pos]) < CHI2_5DF, (pos, freq[pos], p[pos])
    if kind == "deterministic":  # rejection sampling over point masses is lossless too
        freq, p = _position_freqs(accept_sampling, kind, n=8000)
        for pos in range(DEPTH):
            assert _chi2(freq[pos], p[pos], 8000) < CHI2_5DF, (pos, freq[pos], p[pos])


def _broken_rule(tree, logits, sp, rng, pos=0):
    """Accept the first child whenever there is one: not lossless."""
    kids = tree.children(-1)
    return ([kids[0]], 0) if kids else ([], 0)


def _broken_deeper_rule(tree, logits, sp, rng, pos=0):
    """Exact at the first draft level, but then takes the first child of an accepted node unconditionally:
    the first token keeps its distribution, the later ones do not."""
    accepted, nxt = accept_sampling(tree, logits, sp, rng, pos)
    if len(accepted) == 1 and tree.children(accepted[0]):
        child = tree.children(accepted[0])[0]
        accepted.append(child)
        nxt = sample(logits[child + 1], sp, rng.at(pos + 2))
    return accepted, nxt


@pytest.mark.parametrize("kind", ["chain-q", "deterministic"])
def test_broken_acceptance_rule_fails_the_check(kind):
    freq, p = _position_freqs(_broken_rule, kind, n=4000)
    assert 0.5 * np.abs(freq[1] - p[1]).sum() > 0.1  # position 0 is the target's own; the first draft is 1


@pytest.mark.parametrize("rule,kind", [(_broken_deeper_rule, "chain-q"), (accept_sampling, "fixed-child")])
def test_deeper_positions_catch_what_the_first_token_misses(rule, kind):
    """A rule broken below the first level, or a draft node not drawn from the q it declares, leaves the
    first token's distribution exact: only the later positions show it."""
    freq, p = _position_freqs(rule, kind, n=8000)
    assert _chi2(freq[0], p[0], 8000) < CHI2_5DF
    assert max(_chi2(freq[pos], p[pos], 8000) for pos in range(1, DEPTH)) > 5 * CHI2_5DF


def test_siblings_must_share_q():
    """The multi-candidate rule is exact only for siblings drawn without replacement from one shared q:
    a tree whose siblings declare different q is refused (so a new drafter cannot silently break it)."""
    rng = np.random.default_rng(0)
    q1, q2 = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    logits = rng.normal(size=(4, V))
    for tree in (DraftTree([1, 2], [-1, -1], [q1, q2]),  # siblings of the root
                 DraftTree([1, 2, 3], [-1, 0, 0], [q1, q1, q2])):  # siblings deeper down
        with pytest.raises(ValueError, match="siblings"):
            check_siblings_share_q(tree)
        with pytest.raises(ValueError, match="siblings"):
            accept_sampling(tree, logits, SP, PositionRng(0), 0)
    check_siblings_share_q(DraftTree([1, 2], [-1, -1], [q1, q1.copy()]))  # equal values are one q
    check_siblings_share_q(DraftTree([1, 2, 3, 4], [-1, -1, 0, 1], [q1, q1, q1, q2]))  # cousins may differ
    check_siblings_share_q(DraftTree([1, 2], [-1, -1], None))  # point masses


def test_sampled_tokens_follow_target(smol):
    """End to end on a real model: the first two sampled tokens have the same distribution with and
    without speculation (TV bound over 300 seeds each; top-4 sampling, so at most 16 outcomes). The speculative
    runs ask for a third token, so that the second one is drafted and verified: a request drafts no further
    than its max_tokens, so with max_tokens=2 nothing would be drafted at all."""
    from collections import Counter

    prompt = smol.tokenize("My favourite animal is the")
    plain, _, _ = run(smol, prompt, max_tokens=3)  # leaves the prompt cached: each run below evaluates its last token
    n = 300
    counts, drafted = {}, 0
    for name in ("plain", "spec"):
        c = Counter()
        for seed in range(n):
            sp = SamplingParams(temperature=1.0, top_k=4, seed=seed)
            if name == "plain":
                out, _, _ = run(smol, prompt, max_tokens=2, sampling=sp, fresh=False)
            else:
                out, _, st = run(smol, prompt, OracleDrafter(prompt, plain), depth=2, max_tokens=3, sampling=sp,
                                 fresh=False)
                drafted += st.drafted
            c[tuple(out[:2])] += 1
        counts[name] = c
    assert drafted >= 0.9 * n  # the speculative runs drafted their second token (one node each)
    keys = set(counts["plain"]) | set(counts["spec"])
    tv = 0.5 * sum(abs(counts["plain"][k] - counts["spec"][k]) for k in keys) / n
    assert tv < 0.2, tv


def test_accept_greedy_walks_the_tree():
    logits = np.full((5, 10), -5.0)
    logits[0, 3] = logits[2, 4] = logits[3, 9] = 5.0  # root -> 3 -> 4 -> 9
    tree = DraftTree([2, 3, 4, 1], [-1, -1, 1, 2])  # root's children 2 and 3; 3 -> 4 -> 1
    assert accept_greedy(tree, logits) == ([1, 2], 9)


def test_pack_beams_dedups_shared_prefixes():
    tree, leaves = pack_beams([[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9]])
    assert len(tree) == 9  # 1,2,3 + 4 + 5,6 + 7,8,9
    assert tree.parents[:3] == [-1, 0, 1]
    assert [tree.tokens[i] for i in leaves] == [3, 4, 6, 9]
    tree, _ = pack_beams([[1, 2], [1, 2]])
    assert len(tree) == 2


def test_ngram_drafter_proposes_from_history():
    d = NgramDrafter()
    hist = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    tree = d.propose(DraftContext(hist[:-1], hist[-1], None, None), TreeShape(depth=3, width=2))
    assert tree.tokens[:3] == [8, 9, 1] and tree.parents[:3] == [-1, 0, 1]
    tree = d.propose(DraftContext([1, 2, 3], 4, None, None), TreeShape(depth=3))
    assert len(tree) == 0


def test_controller_stops_drafting_when_it_does_not_pay():
    ctl = Controller(ControllerConfig(max_depth=4))
    ctl.verify_s = {1: 0.045, 2: 0.075, 3: 0.1, 4: 0.13, 5: 0.16}
    ctl.accept = [0.1] * 4
    assert ctl.best_depth() == 0
    ctl.accept = [0.95] * 4
    assert ctl.best_depth() >= 2


def test_ngram_gates_nodes_by_cost_and_learns():
    d = NgramDrafter()
    hist = [5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7]
    ctx = DraftContext(hist[:-1], hist[-1], None, None)
    cheap = TreeShape(depth=3, node_cost=(0.1,) * 16)
    dear = TreeShape(depth=3, node_cost=(0.95,) * 16)
    assert d.propose(ctx, cheap).tokens == [8, 9, 1]
    assert len(d.propose(ctx, dear)) == 0  # no match is that sure
    for _ in range(30):  # the target keeps accepting 3-gram matches: their estimate rises
        tree = d.propose(ctx, cheap)
        d.observe(VerifyResult(tree, [0, 1, 2], 4))
    assert d.acc_first[3] > 0.95
    assert len(d.propose(ctx, dear)) >= 1


def test_controller_keeps_trees_within_the_exact_batch(qwen):
    """On the CPU, llama.cpp verifies at most ``exact_rows`` rows (root included): every shape the controller
    hands out, fixed or cost-driven, self-gating or not, fits that, so greedy output stays bit-exact."""
    from edgespec.backends.llama_cpp import EXACT_AMX_ROWS, EXACT_CPU_ROWS, amx_build
    from edgespec.controller import controller_for

    assert qwen.exact_rows == (EXACT_AMX_ROWS if amx_build() else EXACT_CPU_ROWS)
    for drafter, depth in ((NgramDrafter(), None), (NgramDrafter(), 5), (OracleDrafter([], []), 4)):
        ctl = controller_for(drafter, width=2, fixed_depth=depth, exact_rows=EXACT_CPU_ROWS)
        ctl.accept = [0.99] * len(ctl.accept)  # drafting pays: the controller wants the deepest tree
        shape = ctl.next_shape(room=100)
        assert shape.max_nodes == 2 and shape.depth <= 2
    free = controller_for(OracleDrafter([], []), fixed_depth=4, exact_rows=None).next_shape(room=100)
    assert free.depth == 4 and free.max_nodes == 16


def test_probes_back_off_while_drafting_does_not_pay():
    ctl = Controller(ControllerConfig(max_depth=4, probe_every=16, probe_max=256))
    ctl.verify_s = {1: 0.03, 2: 0.055, 3: 0.075}
    ctl.accept = [0.1] * 4
    probes = [i for i in range(600) if ctl.next_shape(room=100).depth > 0]
    assert probes == [15, 47, 111, 239, 495]  # gaps of 16, 32, 64, 128, 256 plain steps
    ctl.accept = [0.99] * 4  # drafting pays again: it drafts, and the probe gap starts over
    assert ctl.next_shape(room=100).depth > 0
    ctl.accept = [0.1] * 4
    assert [i for i in range(40) if ctl.next_shape(room=100).depth > 0] == [15]
