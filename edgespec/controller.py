"""Cost-aware speculation controller: pick the draft depth that maximizes expected tokens per second.

It keeps running estimates of
* the target's verify time for n rows (root included), seeded by ``calibrate`` over 1..16 rows: the whole
  table is used as measured, not assumed linear (on AVX-512 CPUs llama.cpp switches to repacked GEMM
  kernels at 4 rows, so a 4-row verify can cost less than a 3-row one);
* the drafter's time per draft node;
* the acceptance rate at each depth, given the draft reached that depth and its parent was accepted.

For depth L the expected tokens per step are ``1 + sum_{d<=L} prod_{j<=d} a_j`` and the cost is
``verify(nodes(L) + 1) + L * draft``. Depth 0 is plain decoding. While depth 0 wins, a short
probe draft is still tried now and then so that the estimates can recover when the text changes; the gap
between probes doubles after each one (up to ``probe_max`` plain steps) while drafting keeps not paying, and
falls back to ``probe_every`` as soon as it pays, so a drafter that never pays on this hardware costs little.

A self-gating drafter (one that predicts its own acceptance, like the n-gram drafter) gets the
marginal cost of every extra node instead, and drafts the prefix of a proposal with the largest expected gain
(nodes' acceptance chances less their costs, summed: a dear first row can be paid by cheap later ones); with no
confident proposal the step is plain decoding, at no extra cost. Marginal costs come
from the table's lower envelope (the cheapest verify of at least n rows), so a node that takes the batch
into a cheaper kernel is priced at what it really adds.

Exactness is a choice (``exact_rows``, ``exact_context``): with it, no verify exceeds the backend's bit-exact
batch (3 rows on llama.cpp's CPU kernels, while the context is under 256 tokens; past that, plain decoding's own
attention kernel changes and no batch matches it, so the controller stops drafting) and greedy output equals
plain decoding bit for bit; without it, larger batches
run the target's own distribution through other kernels, and greedy output may part from plain decoding
only where the target's top two logits are within rounding of each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgespec.models.drafting.drafter import DraftTree, TreeShape

REPRICE = 16  # verifies between two pricings of the tree's nodes


@dataclass
class ControllerConfig:
    max_depth: int = 6
    width: int = 1
    max_nodes: int = 16
    prior_accept: float = 0.6
    alpha: float = 0.15  # EMA weight of a new observation
    probe_every: int = 16  # plain steps between probes while speculation does not pay ...
    probe_max: int = 256  # ... doubling after each probe up to this
    fixed_depth: int | None = None  # bypass the cost model (benchmarks of a fixed shape)
    self_gating: bool = False  # the drafter predicts its own acceptance and gates each node by cost
    exact_context: int | None = None  # exact mode: draft only while every verify row sits below this position


@dataclass
class Controller:
    cfg: ControllerConfig = field(default_factory=ControllerConfig)
    verify_s: dict[int, float] = field(default_factory=dict)  # nodes -> seconds
    draft_s_per_node: float = 0.0
    accept: list[float] = field(default_factory=list)
    memory: object | None = None  # a memory.live.MemoryGuard: caps the tree to the memory headroom
    _plain_streak: int = 0
    _probe_gap: int = 0
    _costs: tuple[float, ...] | None = None  # node_costs, as last priced
    _since_priced: int = 0

    def __post_init__(self):
        self._probe_gap = self.cfg.probe_every
        if not self.accept:
            self.accept = [self.cfg.prior_accept] * self.cfg.max_depth

    # ---- costs ----------------------------------------------------------------------------------
    def verify_cost(self, n: int) -> float:
        """Interpolated, or linearly extrapolated, verify time for n nodes."""
        if not self.verify_s:
            return 1.0 + 0.5 * (n - 1)  # unitless prior: only ratios matter before calibration
        ks = sorted(self.verify_s)
        vs = [self.verify_s[k] for k in ks]
        if len(ks) == 1:
            return vs[0] * (1.0 + 0.5 * (n - ks[0]) / ks[0])
        if n <= ks[-1]:
            return float(np.interp(n, ks, vs))
        slope = (vs[-1] - vs[-2]) / (ks[-1] - ks[-2])
        return vs[-1] + max(slope, 0.0) * (n - ks[-1])

    def envelope(self, n: int) -> float:
        """The cheapest measured verify of at least ``n`` rows (within the node limit)."""
        top = self.cfg.max_nodes + 1
        return min(self.verify_cost(m) for m in range(n, max(n, top) + 1))

    def nodes_for(self, depth: int) -> int:
        return min(depth * self.cfg.width, self.cfg.max_nodes)

    def expected_rate(self, depth: int) -> float:
        tokens, run = 1.0, 1.0
        for d in range(depth):
            run *= self.accept[d]
            tokens += run
        cost = self.verify_cost(self.nodes_for(depth) + 1) + self.nodes_for(depth) * self.draft_s_per_node
        return tokens / cost

    # ---- decisions ------------------------------------------------------------------------------
    def best_depth(self) -> int:
        if self.cfg.fixed_depth is not None:
            return self.cfg.fixed_depth
        return max(range(self.cfg.max_depth + 1), key=lambda d: (self.expected_rate(d), -d))

    def node_costs(self) -> tuple[float, ...]:
        """Marginal verify cost of each extra node, in plain decoding steps. Worked out again only every
        ``REPRICE`` verifies (a few hundred interpolations: ~1 ms, a plain step's worth of Python otherwise)."""
        if self._costs is None or self._since_priced >= REPRICE:
            self._costs, self._since_priced = self._price_nodes(), 0
        return self._costs

    def _price_nodes(self) -> tuple[float, ...]:
        t1 = self.verify_cost(1)
        n = self.cfg.max_nodes
        env = [self.envelope(k + 1) for k in range(n + 1)]
        return tuple(max(env[k + 1] - env[k], 0.0) / t1 + self.draft_s_per_node / t1 for k in range(n))

    def next_shape(self, room: int, n_cached: int = 0) -> TreeShape:
        """The shape of the next draft, with ``room`` tokens left in the context after ``n_cached``."""
        if self.cfg.exact_context is not None:  # beyond it a batch is not bit-exact (a margin for tree holes)
            room = min(room, self.cfg.exact_context - n_cached - 1 - self.cfg.max_nodes)
        room = max(room, 0)
        max_nodes = min(self.cfg.max_nodes, room)
        if self.memory is not None:  # shrink the tree to what fits; with no room, do not draft
            max_nodes = self.memory.node_cap(max_nodes)
            if max_nodes == 0:
                return TreeShape(0)
        if self.cfg.self_gating and self.cfg.fixed_depth is None:
            return TreeShape(min(self.cfg.max_depth, room, max_nodes), self.cfg.width, max_nodes, self.node_costs(),
                             self.step_s())
        depth = min(self.best_depth(), room, max_nodes)
        if depth == 0 and self.cfg.fixed_depth is None:
            self._plain_streak += 1
            if self._plain_streak >= self._probe_gap and room >= 1:
                self._plain_streak = 0
                self._probe_gap = min(2 * self._probe_gap, self.cfg.probe_max)
                depth = 1
        else:
            self._plain_streak = 0
            self._probe_gap = self.cfg.probe_every  # drafting pays: probe often again once it stops paying
        return TreeShape(depth=depth, width=self.cfg.width, max_nodes=max_nodes, step_s=self.step_s())

    def step_s(self) -> float:
        """Seconds of one plain decoding step, as measured (0 before calibration)."""
        return self.verify_s.get(1, 0.0)

    def observe(self, tree: DraftTree, accepted: list[int], draft_s: float, verify_s: float) -> None:
        a = self.cfg.alpha
        n = len(tree.tokens) + 1
        old = self.verify_s.get(n)
        self.verify_s[n] = verify_s if old is None else (1 - a) * old + a * verify_s
        if n == 1 and old:
            # a one-row step gets dearer as the context grows (attention), and plain steps are most of the
            # observations: the rest of the table moves with it, or its ratios c(n) would shrink towards 1 and
            # a long context would make drafting look free
            f = self.verify_s[1] / old
            for k in self.verify_s:
                if k != 1:
                    self.verify_s[k] *= f
        self._since_priced += 1
        if not tree.tokens:
            return
        per_node = draft_s / len(tree.tokens)
        self.draft_s_per_node = (1 - a) * self.draft_s_per_node + a * per_node if self.draft_s_per_node else per_node
        depth = max(tree.depths())
        for d in range(min(depth, len(accepted) + 1, self.cfg.max_depth)):
            hit = 1.0 if d < len(accepted) else 0.0
            self.accept[d] = (1 - a) * self.accept[d] + a * hit


def controller_for(drafter, width: int | None = None, fixed_depth: int | None = None,
                   costs: dict[int, float] | None = None, exact_rows: int | None = None,
                   exact_context: int | None = None) -> Controller:
    """A controller set up for ``drafter``: its own default width/depth, self-gating when it predicts its
    acceptance, and the verify cost model seeded with ``costs`` (from ``calibrate``). ``exact_rows`` and
    ``exact_context`` (the backend's) make greedy output stay exact: a verify has at most ``exact_rows`` rows,
    root included, and none once the context reaches ``exact_context``."""
    max_nodes = ControllerConfig.max_nodes
    if exact_rows is not None:
        max_nodes = max(min(exact_rows - 1, max_nodes), 0)
    exact_context = exact_context if exact_rows is not None else None
    if drafter is None:
        cfg = ControllerConfig(max_nodes=max_nodes, fixed_depth=fixed_depth, exact_context=exact_context)
    else:
        cfg = ControllerConfig(max_depth=drafter.max_depth, max_nodes=max_nodes, width=width or drafter.default_width,
                               fixed_depth=fixed_depth, self_gating=drafter.self_gating, exact_context=exact_context)
    ctl = Controller(cfg)
    ctl.verify_s.update(costs or {})
    return ctl


CALIBRATION_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def calibrate(backend, sizes: tuple[int, ...] = CALIBRATION_SIZES, reps: int = 2) -> dict[int, float]:
    """Measure the target's verify time for chains of ``sizes`` nodes on top of the current cache."""
    base = len(backend.cached)
    if base == 0:
        backend.prefill(backend.tokenize("def f(x):\n    return x\n", add_special=True))
        base = len(backend.cached)
    out = {}
    tok = backend.cached[-1]
    for n in sizes:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            backend.forward([tok] * n, [-1] + list(range(n - 1)))
            best = min(best, time.perf_counter() - t0)
            backend.truncate(base)
        out[n] = best
    return out
