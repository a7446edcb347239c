"""Model-free n-gram (prompt lookup) drafter over everything in the target's cache.

The history is the committed tokens plus the root: the prompt, earlier turns of the session and
the text generated so far. An index maps each n-gram (n = 1..max_n) to the positions where it
ended, newest last. To draft, the longest suffix of the history that occurred before is looked up,
and the tokens that followed its most recent occurrences become candidate branches; branches are
packed into a prefix-deduplicated tree. Each proposal costs a few dict lookups.

The drafter learns how often the target accepts a first node (and a later node) after a match of
length n, and keeps the prefix of each branch whose nodes' chances of acceptance (of their whole path) most
exceed what the controller says the extra verify rows cost (``TreeShape.keep``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult, pack_beams


@dataclass
class NgramConfig:
    max_n: int = 4
    min_n: int = 1
    max_positions: int = 64  # most recent positions kept per n-gram
    alpha: float = 0.1  # EMA weight of one observed acceptance
    prior_first: float = 0.5  # initial acceptance of a first draft node, scaled by match length below
    prior_next: float = 0.7  # initial acceptance of a node after an accepted one


class NgramDrafter:
    name = "ngram"
    needs_hidden = False
    max_depth = 6
    default_width = 1
    self_gating = True  # predicts its own acceptance per match length

    def __init__(self, cfg: NgramConfig | None = None):
        self.cfg = cfg or NgramConfig()
        c = self.cfg
        # acceptance estimates per match length, learned online; they persist across requests
        self.acc_first = {n: min(0.9, c.prior_first * (0.6 + 0.2 * n)) for n in range(c.min_n, c.max_n + 1)}
        self.acc_next = {n: c.prior_next for n in range(c.min_n, c.max_n + 1)}
        self._last: tuple[DraftTree, list[int]] | None = None
        self.reset()

    def reset(self) -> None:
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def _sync(self, cached: list[int], root: int) -> None:
        """Bring the index up to ``cached + [root]``, rebuilding it if the history was rewritten."""
        h = self.history
        n_ok = len(h) - 1  # the old root may have changed
        if n_ok > len(cached) or (n_ok > 0 and h[n_ok - 1] != cached[n_ok - 1]):
            self.reset()
            h, n_ok = self.history, 0
        n_ok = max(n_ok, 0)
        del h[n_ok:]
        for tokens in (cached[n_ok:], [root]):
            for t in tokens:
                h.append(t)
                self._index_end(len(h))

    def _index_end(self, end: int) -> None:
        h, cfg = self.history, self.cfg
        for n in range(cfg.min_n, min(cfg.max_n, end) + 1):
            lst = self.index[tuple(h[end - n:end])]
            if lst and lst[-1] == end:
                continue
            lst.append(end)
            if len(lst) > cfg.max_positions:
                del lst[0]

    def _candidates(self, shape: TreeShape) -> list[tuple[int, list[int]]]:
        """(match length, continuation) for the most recent matches of the longest suffixes."""
        h = self.history
        end = len(h)
        found: list[tuple[int, list[int]]] = []
        seen_first: set[int] = set()
        for n in range(min(self.cfg.max_n, end - 1), self.cfg.min_n - 1, -1):
            for pos in reversed(self.index.get(tuple(h[end - n:]), ())):
                cont = h[pos:pos + shape.depth] if pos < end else []
                if cont and cont[0] not in seen_first:
                    seen_first.add(cont[0])
                    found.append((n, cont))
                    if len(found) >= shape.width:
                        return found
        return found

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        self._sync(ctx.cached, ctx.root)
        beams, match_n, probs = [], [], []
        n_nodes = 0
        for n, cont in self._candidates(shape):
            paths, path = [], 1.0
            for j in range(len(cont)):
                path *= self.acc_first[n] if j == 0 else self.acc_next[n]
                paths.append(path)
            keep = shape.keep(paths, n_nodes)
            if keep:
                beams.append(cont[:keep])
                match_n.append(n)
                probs.extend(paths[:keep])  # branches start with distinct tokens: they share no node
                n_nodes += keep
        if not beams:
            self._last = None
            return DraftTree()
        tree, leaves = pack_beams(beams)
        tree.p = probs
        node_n = [0] * len(tree.tokens)
        for leaf, n in zip(leaves, match_n, strict=True):
            i = leaf
            while i >= 0 and not node_n[i]:
                node_n[i] = n
                i = tree.parents[i]
        self._last = (tree, node_n)
        return tree

    def observe(self, result: VerifyResult) -> None:
        """Learn the acceptance rate per match length from which nodes the target accepted."""
        if self._last is None or self._last[0] is not result.tree:
            return
        tree, node_n = self._last
        accepted = set(result.accepted)
        a = self.cfg.alpha
        for i, parent in enumerate(tree.parents):
            if parent >= 0 and parent not in accepted:
                continue  # never tested: its parent was rejected
            table = self.acc_first if parent < 0 else self.acc_next
            n = node_n[i]
            table[n] = (1 - a) * table[n] + a * (1.0 if i in accepted else 0.0)

    def footprint(self) -> dict[str, int]:
        entries = sum(len(v) for v in self.index.values())
        now = 8 * len(self.history) + 96 * len(self.index) + 8 * entries
        return {"now": now, "max": now}

    def close(self) -> None:
        pass
