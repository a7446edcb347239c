"""Confidence is measured, not assumed: drafters that guess worse than they believe lose their depth within a
few steps, right ones keep drafting, and the default drafter asks a dear source only while it pays."""

from edgespec.models.drafting.auto import AutoDrafter, Probation
from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult
from edgespec.models.drafting.ngram import NgramDrafter

# marginal verify costs in plain steps, as on a 2-core Xeon (c(2) ~1.5, c(4) ~1.7, c(8) ~2.9)
SHAPE = TreeShape(depth=6, max_nodes=16, node_cost=(0.5, 0.15, 0.05, 0.3, 0.3, 0.3, 0.3, 0.3) + (0.2,) * 8,
                  step_s=0.06)
HISTORY = [5, 6, 7, 8, 9, 10, 11, 12] * 8


def ctx(hidden=None) -> DraftContext:
    return DraftContext(HISTORY[:-1], HISTORY[-1], hidden, None)


def verdict(tree: DraftTree, right: bool) -> VerifyResult:
    accepted = [i for i, p in enumerate(tree.parents) if p == i - 1] if right else []  # the chain, or nothing
    return VerifyResult(tree, accepted, next_token=999)


def test_an_always_wrong_ngram_drafter_goes_plain_within_a_few_steps():
    d = NgramDrafter()
    drafted = 0
    for _ in range(50):
        tree = d.propose(ctx(), SHAPE)
        if not tree.tokens:
            break
        drafted += 1
        assert tree.p is not None and len(tree.p) == len(tree.tokens)
        d.observe(verdict(tree, right=False))
    else:
        raise AssertionError("still drafting after 50 rejected drafts")
    assert drafted <= 8
    assert not d.propose(ctx(), SHAPE).tokens  # and it stays plain while nothing changes


def test_an_always_right_ngram_drafter_keeps_drafting_deeper():
    d = NgramDrafter()
    lengths = []
    for _ in range(60):
        tree = d.propose(ctx(), SHAPE)
        assert tree.tokens, "a drafter that is always right stopped drafting"
        lengths.append(len(tree.tokens))
        d.observe(verdict(tree, right=True))
    assert lengths[-1] == SHAPE.depth and lengths[-1] >= lengths[0]


class FakeHead:
    """A dear source that proposes a confident 3-node chain every time it is asked."""

    name = "redrafter"
    needs_hidden = True
    self_gating = True
    max_depth = 4
    default_width = 1

    def __init__(self):
        self.asked = 0

    def propose(self, ctx, shape):
        self.asked += 1
        return DraftTree([1, 2, 3], [-1, 0, 1], p=[0.9, 0.85, 0.8])

    def observe(self, result):
        pass

    def reset(self):
        pass

    def footprint(self):
        return {"now": 0, "max": 0}

    def close(self):
        pass


def run(auto: AutoDrafter, steps: int, right: bool) -> int:
    """Drive ``auto`` for ``steps`` steps (hidden states only when it asks for them); returns verified drafts."""
    hidden_next, used = True, 0
    for _ in range(steps):
        tree = auto.propose(DraftContext([], 0, [0.0] if hidden_next else None, None), SHAPE)
        hidden_next = auto.needs_hidden
        used += bool(tree.tokens)
        auto.observe(verdict(tree, right=right))
    return used


def test_a_head_that_never_pays_is_asked_ever_more_rarely():
    head = FakeHead()
    auto = AutoDrafter([], head)
    run(auto, 1000, right=False)
    # probes after 16, 32, 64, 128, 256 and then every 256 plain steps: 7 asks in 1000 steps, not 1000
    assert head.asked <= 8
    assert not auto.head_pays() and not auto.needs_hidden


def test_a_head_that_pays_is_asked_every_step_and_said_to_pay():
    head = FakeHead()
    auto = AutoDrafter([], head)
    used = run(auto, 300, right=True)
    assert used >= 300 - 16  # only the wait before its first probe is plain
    assert auto.head_pays() and auto.needs_hidden


def test_the_best_tree_of_several_sources_wins():
    """Per step the tree with the largest expected gain: a confident context match beats a weak head guess."""

    class Weak(FakeHead):
        def propose(self, ctx, shape):
            self.asked += 1
            return DraftTree([1], [-1], p=[0.55])

    head = Weak()
    auto = AutoDrafter([NgramDrafter()], head, Probation(value=1.0, attempts=1))
    ngram = auto.sources[0]
    ngram.acc_first = dict.fromkeys(ngram.acc_first, 0.95)
    ngram.acc_next = dict.fromkeys(ngram.acc_next, 0.95)
    tree = auto.propose(ctx(hidden=[0.0]), SHAPE)
    assert head.asked == 1  # asked (it is paying), but its one weak node lost to the context's chain
    assert tree.tokens[:3] == [5, 6, 7]


def test_the_default_drafters_declared_bytes_match_its_resident_set(qwen_path):
    """/stats and memory_stats() report the drafter's footprint: within 10% of the RSS it adds (a fresh process),
    and under 64 MiB with a shipped head and no adaptation."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import QWEN

    from edgespec import drafters

    assert drafters.redrafter_weights(QWEN) is not None, "the head shipped for the test model is missing"
    script = Path(__file__).parent.parent / "scripts" / "drafter_rss.py"
    r = subprocess.run([sys.executable, str(script), QWEN], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(out["declared_mib"] - out["rss_growth_mib"]) <= 0.1 * out["rss_growth_mib"], out
    assert out["declared_mib"] < 64, out


def test_verify_costs_keep_their_ratios_as_one_row_steps_get_dearer():
    """Plain steps at a long context are slower than at calibration; drafting must not look cheaper for it."""
    from edgespec.controller import Controller

    ctl = Controller()
    ctl.verify_s.update({1: 0.05, 2: 0.075, 4: 0.085})
    for _ in range(40):
        ctl.observe(DraftTree(), [], draft_s=0.0, verify_s=0.08)  # plain steps, 1.6x dearer than calibrated
    assert abs(ctl.verify_s[1] - 0.08) < 1e-3
    assert abs(ctl.verify_s[2] / ctl.verify_s[1] - 1.5) < 1e-9 and abs(ctl.verify_s[4] / ctl.verify_s[1] - 1.7) < 1e-9
