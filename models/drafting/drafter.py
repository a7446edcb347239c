"""The drafter interface: context in, token tree out; accepted results back in.

A tree's nodes are listed parents-first. ``parents[i]`` is the index of node i's parent, or -1 when
node i continues the root (the last token the target produced, not yet in the KV cache).
``q[i]`` is the draft distribution node i was drawn from (shared by siblings), or ``None`` when the
drafter is deterministic (a point mass on each proposed token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TreeShape:
    """What the controller allows for the next draft.

    ``node_cost[k]`` is what adding a (k+1)-th node to the verify batch costs, in units of one plain
    decoding step (tokens plain decoding would have produced meanwhile). A drafter that can predict
    its own acceptance adds a node only when the chance that the target accepts the whole path to it
    is at least that cost; others may ignore it.
    """

    depth: int  # longest root-to-leaf chain of draft nodes; 0 = do not draft
    width: int = 1  # candidates per node (1 = a chain)
    max_nodes: int = 16
    node_cost: tuple[float, ...] = ()
    step_s: float = 0.0  # the measured seconds of one plain decoding step (0: not measured yet)

    def worth(self, path_prob: float, n_nodes: int) -> bool:
        """Is a node whose path is accepted with ``path_prob`` worth verifying as node ``n_nodes + 1``?"""
        if n_nodes >= self.max_nodes:
            return False
        return not self.node_cost or path_prob >= self.node_cost[min(n_nodes, len(self.node_cost) - 1)]

    def cost(self, k: int) -> float:
        """What the (k+1)-th node of the verify batch costs, in plain decoding steps (0 when not priced)."""
        return self.node_cost[min(k, len(self.node_cost) - 1)] if self.node_cost else 0.0

    def keep(self, path_probs: list[float], n_nodes: int = 0) -> int:
        """How many leading nodes of a chain to verify, after ``n_nodes`` already in the batch: the prefix with
        the largest expected gain, the sum of each node's ``path_prob - cost``. Not node by node: where the
        first extra row is dear and later ones cheap (a CPU whose 2-row verify costs ~2 steps but 16 rows
        ~6), a confident long chain pays though its first node alone would not."""
        best_k, best, gain = 0, 0.0, 0.0
        for j, p in enumerate(path_probs):
            if n_nodes + j >= self.max_nodes:
                break
            gain += p - self.cost(n_nodes + j)
            if gain > best + 1e-12:
                best_k, best = j + 1, gain
        return best_k

    def gain(self, tree: DraftTree) -> float:
        """A tree's expected gain over plain decoding, in plain steps: the acceptance chances of its nodes'
        paths (``tree.p``) less what their verify rows cost. 0 for an empty tree; -inf when ``tree.p`` is
        unknown (nothing to compare it by)."""
        if not tree.tokens:
            return 0.0
        if tree.p is None:
            return float("-inf")
        return sum(tree.p) - sum(self.cost(k) for k in range(len(tree.tokens)))


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: list[np.ndarray] | None = None
    p: list[float] | None = None  # each node's calibrated chance that the target accepts its whole path

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (-1 = the root), in proposal order."""
        return [i for i, p in enumerate(self.parents) if p == node]


@dataclass
class DraftContext:
    cached: list[int]  # tokens committed to the target's cache (read-only)
    root: int  # the target's newest token, which the draft continues
    hidden: np.ndarray | None  # target's post-norm hidden state at the position that produced the root
    logits: np.ndarray | None  # target's logits at that position
    sampling: bool = False  # the target samples (a drafter may then propose with a distribution q)


@dataclass
class VerifyResult:
    """What the target decided about a tree: accepted node indices (a chain) and the token after them."""

    tree: DraftTree
    accepted: list[int]
    next_token: int
    hidden: np.ndarray | None = None  # target hidden states of [root] + tree nodes
    logits: np.ndarray | None = None  # target logits of [root] + tree nodes
    root: int = -1  # the token the tree continued
    root_hidden: np.ndarray | None = None  # the target hidden state that produced the root


class Drafter(Protocol):
    """What the core asks of a drafter. The class attributes are read by the controller and the runtime.

    Contract for sampled trees (``q`` not None): the multi-candidate acceptance rule is exact only when the
    children of a node were drawn without replacement from one shared q, so siblings must carry the same
    q (``speculative.check_siblings_share_q`` enforces it). A tree with ``q`` None is deterministic: the
    target samples its own token at each level and the walk follows the matching child.
    """

    name: str
    needs_hidden: bool  # propose() reads DraftContext.hidden (the backend must return hidden states)
    self_gating: bool  # it predicts its own acceptance and gates each node by TreeShape.node_cost
    max_depth: int  # deepest draft it makes
    default_width: int  # candidates per node when the user sets none

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree: ...

    def observe(self, result: VerifyResult) -> None: ...

    def reset(self) -> None:
        """Forget per-request state (called when a new prompt starts)."""
        ...

    def footprint(self) -> dict[str, int]:
        """Bytes this drafter uses: {"now": ..., "max": ...}."""
        ...

    def close(self) -> None:
        """Free what the drafter holds (a draft model's backend, ...)."""
        ...


def pack_beams(beams: list[list[int]], scores: list[float] | None = None) -> tuple[DraftTree, list[int]]:
    """Pack token sequences into a prefix-deduplicated tree. Returns the tree and each beam's leaf node.

    Beams that share a prefix share its nodes; nodes are emitted parents-first, in beam order.
    """
    tree = DraftTree()
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    leaves = []
    order = range(len(beams)) if scores is None else sorted(range(len(beams)), key=lambda i: -scores[i])
    leaf_of = {}
    for b in order:
        parent = -1
        for tok in beams[b]:
            key = (parent, tok)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tree.tokens)
                tree.tokens.append(tok)
                tree.parents.append(parent)
            parent = node
        leaf_of[b] = parent
    leaves = [leaf_of[b] for b in range(len(beams))]
    return tree, leaves
