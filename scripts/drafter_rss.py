"""Resident memory of the default drafter against what it declares (``footprint``, shown by ``/stats`` and
``Runtime.memory_stats``): RSS of a fresh process before and after building ``draft=auto`` for a model (its
n-gram index and ReDrafter head, no adaptation) and drafting 200 times from random hidden states.

    .venv/bin/python scripts/drafter_rss.py qwen2.5-coder-1.5b
"""

from __future__ import annotations

import json
import sys

import numpy as np

from edgespec import drafters, registry
from edgespec.memory.live import rss_bytes
from edgespec.models.drafting.drafter import DraftContext, TreeShape


def measure(model: str, drafts: int = 200) -> dict:
    from edgespec.backends.llama_cpp import LlamaCppBackend

    target = LlamaCppBackend(registry.resolve(model), n_ctx=256, huge_pages=False)  # no collapsing under the count
    before = rss_bytes()
    d = drafters.make(drafters.parse("auto", model), target, model, open_backend=None)
    rng = np.random.default_rng(0)
    shape = TreeShape(4, 1, 16, (0.2,) * 16)
    for i in range(drafts):
        h = rng.standard_normal(d.head.cfg.n_embd).astype(np.float32)
        d.head.propose(DraftContext([1, 2, 3], 100 + i, h, None), shape)
    grown = rss_bytes() - before
    target.close()
    return {"model": model, "rss_growth_mib": round(grown / 2**20, 1),
            "declared_mib": round(d.footprint()["now"] / 2**20, 1)}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1] if len(sys.argv) > 1 else registry.DEFAULT_MODEL)))
