"""Predicted outputs: a drafter that proposes from text the client expects the answer to mostly repeat.

OpenAI's ``prediction: {"type": "content", "content": ...}``: an editor sends the current file and asks for an
edit, so most of the answer is already known. This is prompt lookup over the prediction: the longest suffix of
the output so far (up to ``max_n`` tokens) is looked up in the predicted tokens, at the occurrence nearest
after the previous alignment (the output walks through the prediction in order), and the tokens that follow
it there are the draft. Where the output departs from the prediction (the edited part), nothing matches and
the step decodes plainly; once the output joins the prediction again, a suffix matches and drafting resumes.

Self-gating like the n-gram drafter: it learns, per request, how often a first node and a later node are
accepted, and drafts the prefix of the continuation that is expected to pay most for its verify rows. It counts
accepted and rejected prediction tokens for ``usage.completion_tokens_details``. Deterministic proposals,
so greedy output is the target's own whatever is predicted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass

from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult


@dataclass
class PredictionConfig:
    max_n: int = 8  # longest output suffix looked up
    min_n: int = 1
    alpha: float = 0.2  # EMA weight of one observed acceptance
    prior_next: float = 0.9  # acceptance of a node after an accepted one, before anything is observed
    recover: float = 0.05  # per skipped step, a first-node rate moves back this far towards its prior


def prior_first(n: int) -> float:
    """Acceptance of the first node after a match of ``n`` tokens, before anything is observed: a long match
    means the output has (re)joined the prediction."""
    return min(0.95, 0.45 + 0.07 * n)


class PredictionDrafter:
    name = "prediction"
    needs_hidden = False
    self_gating = True
    max_depth = 16
    default_width = 1

    def __init__(self, predicted: list[int], cfg: PredictionConfig | None = None):
        self.cfg = cfg or PredictionConfig()
        self.pred = list(predicted)
        self.index: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> end positions, ascending
        c = self.cfg
        for end in range(1, len(self.pred) + 1):
            for n in range(c.min_n, min(c.max_n, end) + 1):
                self.index[tuple(self.pred[end - n:end])].append(end)
        self.accepted_tokens = 0  # drafted prediction tokens the target accepted
        self.rejected_tokens = 0  # drafted prediction tokens it did not
        self.reset()

    def reset(self) -> None:
        self.start: int | None = None  # cache length when the output began (the prompt's length)
        self.cursor = 0  # position in the prediction just after the last aligned match
        self.acc_first = {n: prior_first(n) for n in range(self.cfg.min_n, self.cfg.max_n + 1)}  # per match length
        self.acc_next = self.cfg.prior_next
        self._last: DraftTree | None = None
        self._end = self._n = 0

    def _align(self, out: list[int]) -> tuple[int, int] | None:
        """(end position in the prediction, match length) of the longest suffix of ``out`` found there, at the
        occurrence nearest at or after the cursor (else the last one before it); None when nothing matches."""
        for n in range(min(self.cfg.max_n, len(out)), self.cfg.min_n - 1, -1):
            ends = self.index.get(tuple(out[-n:]))
            if not ends:
                continue
            i = bisect_left(ends, self.cursor)
            return (ends[i] if i < len(ends) else ends[-1]), n
        return None

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        if self.start is None:
            self.start = len(ctx.cached)
        k = self.cfg.max_n - 1
        out = ctx.cached[max(self.start, len(ctx.cached) - k):] + [ctx.root]
        found = self._align(out)
        self._last = None
        if found is None or found[0] >= len(self.pred):
            return DraftTree()
        end, n = found
        cont = self.pred[end:end + shape.depth]
        paths, path = [], 1.0
        for j in range(len(cont)):
            path *= self.acc_first[n] if j == 0 else self.acc_next
            paths.append(path)
        keep = shape.keep(paths)
        if not keep:  # not confident enough: decode plainly, and let the estimate drift back to the prior
            self.acc_first[n] += self.cfg.recover * (prior_first(n) - self.acc_first[n])
            return DraftTree()
        tree = DraftTree(tokens=cont[:keep], parents=list(range(-1, keep - 1)), p=paths[:keep])
        self._last, self._end, self._n = tree, end, n
        return tree

    def observe(self, result: VerifyResult) -> None:
        tree = self._last
        if tree is None or result.tree is not tree:
            return
        n_acc = len(result.accepted)
        self.accepted_tokens += n_acc
        self.rejected_tokens += len(tree.tokens) - n_acc
        self.cursor = self._end + n_acc
        a = self.cfg.alpha
        self.acc_first[self._n] = (1 - a) * self.acc_first[self._n] + a * (1.0 if n_acc else 0.0)
        for i in range(1, min(n_acc + 1, len(tree.tokens))):  # nodes tried after an accepted parent
            self.acc_next = (1 - a) * self.acc_next + a * (1.0 if i < n_acc else 0.0)
        self._last = None

    def footprint(self) -> dict[str, int]:
        now = 8 * len(self.pred) + (96 + 8) * len(self.index) * 2
        return {"now": now, "max": now}

    def close(self) -> None:
        pass
