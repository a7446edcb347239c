"""The speculative loop: draft a tree, verify it in one target forward, accept, commit, stream.

Each step the drafter continues the *root* (the target's newest token, not yet in the KV cache).
The target evaluates ``[root] + tree`` in one batch; row 0 predicts the first draft level and row
``i + 1`` predicts the children of draft node ``i``. Acceptance walks down from the root:

* a deterministic tree (``q`` is None: greedy, n-gram, ReDrafter beams): the target draws its own token at
  each level, exactly as plain decoding would (argmax, or the sample of output position k from the stream
  ``rng.at(k)``), and the walk follows the child with that token. A point-mass draft is accepted with
  probability p(x), as rejection sampling would, and the text is a function of the seed alone, whatever
  the drafter proposed and however deep the controller drafted;
* a sampled tree (each node drawn from a distribution q, shared by siblings drawn without replacement):
  try the children in order, accept child x with probability min(1, p(x)/q(x)); on a rejection p becomes
  the residual norm(max(0, p - q)) and x leaves q; when every child is rejected, sample from what is left
  of p. All draws for output position k come from ``rng.at(k)``.

The target's token after the accepted chain (correction or bonus) becomes the next root.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from edgespec.backends.base import Backend, ForwardOut
from edgespec.controller import Controller
from edgespec.generate import Stats, StepSource
from edgespec.models.drafting.drafter import DraftContext, Drafter, DraftTree, TreeShape, VerifyResult
from edgespec.sampling import PositionRng, SamplingParams, probs, sample, sample_from


def accept_greedy(tree: DraftTree, logits: np.ndarray) -> tuple[list[int], int]:
    return accept_matching(tree, logits, SamplingParams(), None, 0)


def accept_matching(tree: DraftTree, logits: np.ndarray, sp: SamplingParams, rng: PositionRng | None,
                    pos: int) -> tuple[list[int], int]:
    """Deterministic trees: the target's own token at each level (argmax, or its sample of output position
    ``pos + depth``); follow the child that matches it."""
    accepted, node = [], -1
    while True:
        row = logits[node + 1]
        target = int(np.argmax(row)) if sp.greedy else sample(row, sp, rng.at(pos + len(accepted)))
        child = next((c for c in tree.children(node) if tree.tokens[c] == target), None)
        if child is None:
            return accepted, target
        accepted.append(child)
        node = child


def check_siblings_share_q(tree: DraftTree) -> None:
    """The multi-candidate rule is exact only when siblings were drawn without replacement from one q."""
    if tree.q is None:
        return
    for node in [-1] + list(range(len(tree.tokens))):
        kids = tree.children(node)
        first = tree.q[kids[0]] if kids else None
        for c in kids[1:]:
            if tree.q[c] is not first and not np.array_equal(tree.q[c], first):
                raise ValueError(f"draft nodes {kids[0]} and {c} are siblings with different q: the acceptance "
                                 "rule needs siblings drawn from one shared distribution")


def accept_sampling(tree: DraftTree, logits: np.ndarray, sp: SamplingParams,
                    rng: PositionRng | np.random.Generator, pos: int = 0) -> tuple[list[int], int]:
    """Rejection sampling over a tree of sampled nodes (``rng``: a ``PositionRng``, or one Generator for
    every position)."""
    check_siblings_share_q(tree)
    accepted, node = [], -1
    while True:
        p = probs(logits[node + 1], sp)
        g = rng.at(pos + len(accepted)) if isinstance(rng, PositionRng) else rng
        q = None
        for child in tree.children(node):
            x = tree.tokens[child]
            if tree.q is not None and q is None:
                q = tree.q[child].astype(np.float64)  # siblings share the distribution they were drawn from
            qx = 1.0 if q is None else q[x]
            if qx > 0 and g.random() * qx < p[x]:  # accept with probability min(1, p(x) / q(x))
                accepted.append(child)
                node = child
                break
            if q is None:  # point mass: the residual is p without x
                p[x] = 0.0
            else:
                residual = np.maximum(p - q, 0.0)
                p = residual if residual.sum() > 0 else p
                q[x] = 0.0
                q = q / q.sum() if q.sum() > 0 else q
            p = p / p.sum()
        else:  # every child rejected, or a leaf reached: the target picks the next token
            return accepted, sample_from(p, g)


def speculative_steps(drafter: Drafter, controller: Controller) -> StepSource:
    """A step source for ``generate.stream`` that speculates with ``drafter`` under ``controller``."""

    def steps(backend: Backend, first: ForwardOut, sp: SamplingParams, rng: PositionRng,
              stats: Stats, max_tokens: int) -> Iterator[list[int]]:
        drafter.reset()
        logits = first.logits[-1]
        hidden = first.hidden[-1] if first.hidden is not None else None
        root = sample(logits, sp, None if sp.greedy else rng.at(0))
        pos = 1  # output position of the first draft level
        yield [root]
        while True:
            # no draft past the context's end, nor past the request's: a step yields its accepted tokens plus one
            room = min(backend.n_ctx - len(backend.cached) - 1, max_tokens - pos - 1)
            shape = controller.next_shape(room, len(backend.cached))
            t0 = time.perf_counter()
            tree = DraftTree()
            if shape.depth > 0:
                tree = drafter.propose(DraftContext(backend.cached, root, hidden, logits, not sp.greedy), shape)
            t1 = time.perf_counter()
            hidden_on = drafter.needs_hidden  # read every step: a drafter that will not draft next asks for none
            out = backend.forward([root] + tree.tokens, [-1] + [p + 1 for p in tree.parents], want_hidden=hidden_on)
            t2 = time.perf_counter()
            if sp.greedy or tree.q is None:
                accepted, nxt = accept_matching(tree, out.logits, sp, rng, pos)
            else:
                accepted, nxt = accept_sampling(tree, out.logits, sp, rng, pos)
            pos += len(accepted) + 1
            backend.commit([0] + [i + 1 for i in accepted])
            drafter.observe(VerifyResult(tree, accepted, nxt, out.hidden, out.logits, root, hidden))
            controller.observe(tree, accepted, draft_s=t1 - t0, verify_s=t2 - t1)
            _count(stats, tree, accepted, t1 - t0)
            last = accepted[-1] + 1 if accepted else 0
            logits, hidden = out.logits[last], out.hidden[last] if hidden_on else None
            root = nxt
            yield [tree.tokens[i] for i in accepted] + [nxt]

    return steps


def _count(stats: Stats, tree: DraftTree, accepted: list[int], draft_s: float) -> None:
    stats.verifies += 1
    stats.draft_s += draft_s
    if not tree.tokens:
        return
    stats.drafted += len(tree.tokens)
    stats.accepted += len(accepted)
    depth = max(tree.depths())
    for lst in (stats.drafted_per_depth, stats.accepted_per_depth):
        lst.extend([0] * (depth - len(lst)))
    for d in range(depth):
        stats.drafted_per_depth[d] += 1  # a draft reached depth d + 1 ...
    for d in range(len(accepted)):
        stats.accepted_per_depth[d] += 1  # ... and the target accepted that far


__all__ = ["accept_greedy", "accept_matching", "accept_sampling", "speculative_steps", "TreeShape"]
