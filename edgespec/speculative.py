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
from edgespec.generate import Stats, StepSource, pick
from edgespec.models.drafting.drafter import DraftContext, Drafter, DraftTree, TreeShape, VerifyResult
from edgespec.sampling import PositionRng, SamplingParams, probs, sample, sample_from
from edgespec.structured import Constraint


def accept_greedy(tree: DraftTree, logits: np.ndarray) -> tuple[list[int], int]:
    return accept_matching(tree, logits, SamplingParams(), None, 0)


def _row(logits: np.ndarray, node: int, rows: list[int] | None, constraint: Constraint | None) -> np.ndarray:
    """The target's logits after ``node`` (-1: the root), under the grammar's mask when constrained."""
    row = logits[node + 1 if rows is None else rows[node + 1]]
    return row if constraint is None else constraint.masked(row)


def _advance(tree: DraftTree, child: int, constraint: Constraint | None) -> None:
    if constraint is not None:
        constraint.consume([tree.tokens[child]])


def accept_matching(tree: DraftTree, logits: np.ndarray, sp: SamplingParams, rng: PositionRng | None,
                    pos: int, constraint: Constraint | None = None,
                    rows: list[int] | None = None) -> tuple[list[int], int]:
    """Deterministic trees: the target's own token at each level (argmax, or its sample of output position
    ``pos + depth``); follow the child that matches it. Under a ``constraint`` each level's distribution is
    the grammar's masked one and the accepted tokens are consumed (the returned token is not); ``rows[i + 1]``
    is the logits row of node ``i`` when the verified tree was cut (``prune``)."""
    accepted, node = [], -1
    while True:
        row = _row(logits, node, rows, constraint)
        target = int(np.argmax(row)) if sp.greedy else sample(row, sp, rng.at(pos + len(accepted)))
        child = next((c for c in tree.children(node) if tree.tokens[c] == target), None)
        if child is None:
            return accepted, target
        _advance(tree, child, constraint)
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
                    rng: PositionRng | np.random.Generator, pos: int = 0, constraint: Constraint | None = None,
                    rows: list[int] | None = None) -> tuple[list[int], int]:
    """Rejection sampling over a tree of sampled nodes (``rng``: a ``PositionRng``, or one Generator for
    every position). ``constraint``/``rows``: as ``accept_matching``; a child the grammar rejects has p = 0, so
    it is rejected as any other (its q still leaves the residual), never accepted."""
    check_siblings_share_q(tree)
    accepted, node = [], -1
    while True:
        p = probs(_row(logits, node, rows, constraint), sp)
        g = rng.at(pos + len(accepted)) if isinstance(rng, PositionRng) else rng
        q = None
        for child in tree.children(node):
            x = tree.tokens[child]
            if tree.q is not None and q is None:
                q = tree.q[child].astype(np.float64)  # siblings share the distribution they were drawn from
            qx = 1.0 if q is None else q[x]
            if qx > 0 and g.random() * qx < p[x]:  # accept with probability min(1, p(x) / q(x))
                _advance(tree, child, constraint)
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


def prune(tree: DraftTree, constraint: Constraint) -> tuple[DraftTree, list[int]]:
    """The part of ``tree`` the grammar allows (a path is cut at its first rejected token), and for each node of
    ``tree`` (after the root, at 0) its row in ``[root] + pruned`` (-1 for a cut node)."""
    n = len(tree.tokens)
    ok = [False] * n
    has_child = [False] * n
    for p in tree.parents:
        if p >= 0:
            has_child[p] = True
    for leaf in (i for i in range(n) if not has_child[i]):
        path = [leaf]
        while tree.parents[path[-1]] >= 0:
            path.append(tree.parents[path[-1]])
        path.reverse()
        for node in path[:constraint.valid_prefix([tree.tokens[i] for i in path])]:
            ok[node] = True
    if all(ok):
        return tree, list(range(n + 1))
    rows, kept = [0] + [-1] * n, []
    for i in range(n):
        if ok[i]:
            kept.append(i)
            rows[i + 1] = len(kept)
    cut = DraftTree([tree.tokens[i] for i in kept], [rows[tree.parents[i] + 1] - 1 for i in kept],
                    None if tree.q is None else [tree.q[i] for i in kept],
                    None if tree.p is None else [tree.p[i] for i in kept])
    return cut, rows


def speculative_steps(drafter: Drafter | None, controller: Controller, constraint: Constraint | None = None,
                      jump_forward: bool = True) -> StepSource:
    """A step source for ``generate.stream`` that speculates with ``drafter`` (None: no drafts) under
    ``controller``. Under a ``constraint`` (structured output): every verified row is sampled from the grammar's
    masked distribution, drafts are cut at their first token the grammar rejects before they are verified, and
    (``jump_forward``) the tokens the grammar forces (one allowed token) are appended without sampling and
    evaluated in one batch with the next free position."""

    def steps(backend: Backend, first: ForwardOut, sp: SamplingParams, rng: PositionRng,
              stats: Stats, max_tokens: int) -> Iterator[list[int]]:
        if drafter is not None:
            drafter.reset()
        hidden_on = drafter is not None and drafter.needs_hidden
        logits = first.logits[-1]
        hidden = first.hidden[-1] if first.hidden is not None else None
        root = pick(logits, sp, rng, 0, constraint)
        pos = 1  # output position of the first draft level
        yield [root]
        while True:
            # no draft past the context's end, nor past the request's: a step yields its accepted tokens plus one
            room = min(backend.n_ctx - len(backend.cached) - 1, max_tokens - pos - 1)
            hidden_on = drafter is not None and drafter.needs_hidden  # read every step: a drafter that will not
            # draft next asks for none
            if constraint is not None and jump_forward:
                if constraint.forced() in backend.info.eog:  # the grammar is complete: end without a forward
                    tok = constraint.forced()
                    constraint.consume([tok])
                    yield [tok]
                    return
                forced = _forced(constraint, backend, controller, room)
                if forced:
                    logits, hidden, root, pos = _jump(backend, root, forced, hidden_on, sp, rng, pos, constraint,
                                                      stats)
                    yield forced + [root]
                    continue
            shape = controller.next_shape(room, len(backend.cached))
            t0 = time.perf_counter()
            tree = DraftTree()
            if shape.depth > 0 and drafter is not None:
                tree = drafter.propose(DraftContext(backend.cached, root, hidden, logits, not sp.greedy), shape)
            full, rows = tree, None
            if constraint is not None and tree.tokens:
                tree, rows = prune(full, constraint)
                stats.pruned += len(full.tokens) - len(tree.tokens)
            t1 = time.perf_counter()
            out = backend.forward([root] + tree.tokens, [-1] + [p + 1 for p in tree.parents], want_hidden=hidden_on)
            t2 = time.perf_counter()
            if sp.greedy or full.q is None:
                accepted, nxt = accept_matching(full, out.logits, sp, rng, pos, constraint, rows)
            else:
                accepted, nxt = accept_sampling(full, out.logits, sp, rng, pos, constraint, rows)
            if rows is not None:  # indices in the verified tree
                accepted = [rows[i + 1] - 1 for i in accepted]
            if constraint is not None:
                constraint.consume([nxt])
                stats.grammar_s = constraint.grammar_s
            pos += len(accepted) + 1
            backend.commit([0] + [i + 1 for i in accepted])
            if drafter is not None:
                drafter.observe(VerifyResult(tree, accepted, nxt, out.hidden, out.logits, root, hidden))
            controller.observe(tree, accepted, draft_s=t1 - t0, verify_s=t2 - t1)
            _count(stats, tree, accepted, t1 - t0)
            last = accepted[-1] + 1 if accepted else 0
            logits, hidden = out.logits[last], out.hidden[last] if hidden_on else None
            root = nxt
            yield [tree.tokens[i] for i in accepted] + [nxt]

    return steps


def _forced(constraint: Constraint, backend: Backend, controller: Controller, room: int) -> list[int]:
    """The tokens the grammar forces after the root (consumed), as many as one verify may hold here: at most
    the controller's node cap (in exact mode, the rows that stay bit-exact) and the context's room."""
    cap = min(controller.cfg.max_nodes, room - 1)
    if controller.memory is not None:
        cap = controller.memory.node_cap(cap)
    exact_context = controller.cfg.exact_context
    if exact_context is not None:
        cap = min(cap, exact_context - len(backend.cached) - 2)
    forced: list[int] = []
    eog = backend.info.eog
    while len(forced) < cap:
        tok = constraint.forced()
        if tok is None or tok in eog:  # the end is left to the next free position (as plain decoding does)
            break
        constraint.consume([tok])
        forced.append(tok)
    return forced


def _jump(backend: Backend, root: int, forced: list[int], hidden_on: bool, sp: SamplingParams, rng: PositionRng,
          pos: int, constraint: Constraint, stats: Stats):
    """Evaluate ``[root] + forced`` in one batch and pick the token after them from the last row."""
    n = len(forced) + 1
    out = backend.forward([root] + forced, list(range(-1, n - 1)), want_hidden=hidden_on)
    backend.commit(list(range(n)))
    stats.verifies += 1
    stats.forced += len(forced)
    pos += len(forced)
    logits = out.logits[-1]
    hidden = out.hidden[-1] if hidden_on else None
    nxt = pick(logits, sp, rng, pos, constraint)
    stats.grammar_s = constraint.grammar_s
    return logits, hidden, nxt, pos + 1


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


__all__ = ["accept_greedy", "accept_matching", "accept_sampling", "prune", "speculative_steps", "TreeShape"]
