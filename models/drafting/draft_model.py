"""Same-vocabulary draft-model drafter: a small model of the target's family drafts a greedy chain.

The draft model has its own backend and KV cache. Before each proposal its cache is synced to the
target's committed tokens: the common prefix is kept, the rest (rejected drafts, or a new prompt) is
truncated, and only the missing tokens are evaluated. So rollbacks on the target side never leave the
draft cache out of step.
"""

from __future__ import annotations

import numpy as np

from edgespec.backends.base import Backend, common_prefix
from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult


class DraftModelDrafter:
    name = "draft-model"
    needs_hidden = False
    self_gating = False
    max_depth = 6
    default_width = 1

    def __init__(self, backend: Backend, target_vocab: int | None = None):
        if target_vocab is not None and backend.info.n_vocab > target_vocab:
            raise ValueError(f"draft vocabulary ({backend.info.n_vocab}) is larger than the target's "
                             f"({target_vocab}); use a cross-vocabulary drafter")
        self.backend = backend

    def reset(self) -> None:
        pass  # the cache is synced by prefix at every proposal

    def sync(self, tokens: list[int]) -> np.ndarray:
        """Make the draft cache hold ``tokens[:-1]`` and evaluate the last one; return its logits."""
        b = self.backend
        keep = min(common_prefix(b.cached, tokens), len(tokens) - 1)
        b.truncate(keep)
        if len(tokens) - keep > 1:
            b.prefill(tokens[keep:-1])
        out = b.forward([tokens[-1]], [-1], want_hidden=False)
        b.commit([0])
        return out.logits[0]

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        depth = min(shape.depth, shape.max_nodes, self.backend.n_ctx - len(ctx.cached) - 2)
        if depth <= 0:
            return DraftTree()
        logits = self.sync(ctx.cached + [ctx.root])
        tokens: list[int] = []
        for d in range(depth):
            tok = int(np.argmax(logits))
            tokens.append(tok)
            if d + 1 < depth:
                out = self.backend.forward([tok], [-1], want_hidden=False)
                self.backend.commit([0])
                logits = out.logits[0]
        return DraftTree(tokens, [-1] + list(range(depth - 1)))

    def observe(self, result: VerifyResult) -> None:
        pass

    def footprint(self) -> dict[str, int]:
        m = self.backend.memory()
        return {"now": m.weights_bytes + m.kv_used_bytes, "max": m.weights_bytes + m.kv_reserved_bytes}

    def close(self) -> None:
        self.backend.close()
