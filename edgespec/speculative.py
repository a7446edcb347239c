"""The speculative loop: draft a tree, verify it in one target forward, accept, commit, stream.

Each step the drafter continues the *root* (the target's newest token, not yet in the KV cache).
The target evaluates ``[root] + tree`` in one batch; row 0 predicts the first draft level and row
``i + 1`` predicts the children of draft node ``i``. Acceptance walks down from the root:

* greedy: follow the child whose token is the target's argmax (exact);
* sampling: try the children in order, accept child x with probability min(1, p(x)/q(x)); on a
  rejection p becomes the residual norm(max(0, p - q)) and x leaves q; when every child is rejected,
  sample from what is left of p. With a deterministic drafter q is a point mass (q(x) = 1).

The target's token after the accepted chain (correction or bonus) becomes the next root.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from edgespec.backends.base import Backend, ForwardOut
from edgespec.controller import Controller
from edgespec.generate import Stats, StepSource
from edgespec.models.drafter import DraftContext, Drafter, DraftTree, TreeShape, VerifyResult
from edgespec.sampling import SamplingParams, probs, sample, sample_from


def accept_greedy(tree: DraftTree, logits: np.ndarray) -> tuple[list[int], int]:
    accepted, node = [], -1
    while True:
        target = int(np.argmax(logits[node + 1]))
        child = next((c for c in tree.children(node) if tree.tokens[c] == target), None)
        if child is None:
            return accepted, target
        accepted.append(child)
        node = child


def accept_sampling(tree: DraftTree, logits: np.ndarray, sp: SamplingParams,
                    rng: np.random.Generator) -> tuple[list[int], int]:
    accepted, node = [], -1
    while True:
        p = probs(logits[node + 1], sp)
        q = None
        for child in tree.children(node):
            x = tree.tokens[child]
            if tree.q is not None and q is None:
                q = tree.q[child].astype(np.float64)  # siblings share the distribution they were drawn from
            qx = 1.0 if q is None else q[x]
            if qx > 0 and rng.random() * qx < p[x]:  # accept with probability min(1, p(x) / q(x))
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
            return accepted, sample_from(p, rng)


def speculative_steps(drafter: Drafter, controller: Controller) -> StepSource:
    """A step source for ``generate.stream`` that speculates with ``drafter`` under ``controller``."""

    def steps(backend: Backend, first: ForwardOut, sp: SamplingParams, rng: np.random.Generator,
              stats: Stats) -> Iterator[list[int]]:
        drafter.reset()
        logits = first.logits[-1]
        hidden = first.hidden[-1] if first.hidden is not None else None
        root = sample(logits, sp, rng)
        yield [root]
        while True:
            room = backend.n_ctx - len(backend.cached) - 1
            shape = controller.next_shape(room)
            t0 = time.perf_counter()
            tree = DraftTree()
            if shape.depth > 0:
                tree = drafter.propose(DraftContext(backend.cached, root, hidden, logits, not sp.greedy), shape)
            t1 = time.perf_counter()
            out = backend.forward([root] + tree.tokens, [-1] + [p + 1 for p in tree.parents])
            t2 = time.perf_counter()
            if sp.greedy:
                accepted, nxt = accept_greedy(tree, out.logits)
            else:
                accepted, nxt = accept_sampling(tree, out.logits, sp, rng)
            backend.commit([0] + [i + 1 for i in accepted])
            drafter.observe(VerifyResult(tree, accepted, nxt, out.hidden, out.logits, root, hidden))
            controller.observe(tree, accepted, draft_s=t1 - t0, verify_s=t2 - t1)
            _count(stats, tree, accepted, t1 - t0)
            last = accepted[-1] + 1 if accepted else 0
            logits, hidden = out.logits[last], out.hidden[last]
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


__all__ = ["accept_greedy", "accept_sampling", "speculative_steps", "TreeShape"]
