"""Model-free n-gram (prompt lookup) drafter over everything in the target's cache.

The history is the committed tokens plus the root: the prompt, earlier turns of the session and
the text generated so far. An index maps each n-gram (n = 1..max_n) to the positions where it
ended, newest last. To draft, the longest suffix of the history that occurred before is looked up,
and the tokens that followed its most recent occurrences become candidate branches; branches are
packed into a prefix-deduplicated tree. Each proposal costs a few dict lookups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from edgespec.models.drafter import DraftContext, DraftTree, TreeShape, VerifyResult, pack_beams


@dataclass
class NgramConfig:
    max_n: int = 4
    min_n: int = 1
    max_positions: int = 64  # most recent positions kept per n-gram


class NgramDrafter:
    name = "ngram"

    def __init__(self, cfg: NgramConfig | None = None):
        self.cfg = cfg or NgramConfig()
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

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        self._sync(ctx.cached, ctx.root)
        h = self.history
        end = len(h)
        beams: list[list[int]] = []
        seen_first: set[int] = set()
        for n in range(min(self.cfg.max_n, end - 1), self.cfg.min_n - 1, -1):
            for pos in reversed(self.index.get(tuple(h[end - n:]), ())):
                if pos >= end:
                    continue  # the suffix itself
                cont = h[pos:pos + shape.depth]
                if not cont or cont[0] in seen_first:
                    continue
                seen_first.add(cont[0])
                beams.append(cont)
                if len(beams) >= shape.width:
                    break
            if len(beams) >= shape.width:
                break
        if not beams:
            return DraftTree()
        tree, _ = pack_beams(beams)
        if len(tree.tokens) > shape.max_nodes:
            keep = list(range(shape.max_nodes))  # parents-first order: a prefix is a valid tree
            tree = DraftTree([tree.tokens[i] for i in keep], [tree.parents[i] for i in keep])
        return tree

    def observe(self, result: VerifyResult) -> None:
        pass  # the history is re-read from the target's cache at the next proposal

    def footprint(self) -> dict[str, int]:
        entries = sum(len(v) for v in self.index.values())
        now = 8 * len(self.history) + 96 * len(self.index) + 8 * entries
        return {"now": now, "max": now}
