"""SpecMemo-style planner: the fastest configuration whose predicted footprint fits a memory budget.

Knobs, from most to least valuable when memory is short:
1. speculation (the drafter and the verify-tree buffers) - dropped first only if nothing else fits;
2. context length - halved down to ``min_ctx``;
3. KV type - f16, then q8_0, then q4_0;
4. prefill batch - 512, 128, then 32 tokens (the compute buffer holds one batch of logits).
A plan keeps ``SAFETY`` of the budget free for what the model does not predict (allocator slack).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgespec.memory.footprint import Footprint, ModelShape, read_shape, run_footprint

SAFETY = 0.05
KV_ORDER = ("f16", "q8_0", "q4_0")
BATCHES = (512, 128, 32)
SPEC_TREE_NODES = 4  # verify nodes planned for (the live guard caps the tree to what fits at run time)
BACKEND_KV = {"mlx": ("f16",)}  # KV types a backend can hold (default: all of KV_ORDER)
DraftBytes = Callable[[int, str], int]  # (n_ctx, kv_type) -> bytes the drafter holds (declared by the core)


class BudgetError(ValueError):
    """The budget is below what the model needs; the message names the smallest budget that works."""


@dataclass
class Plan:
    budget: int
    backend: str
    n_ctx: int
    kv_type: str
    n_batch: int
    draft: str | None
    tree_nodes: int
    footprint: Footprint
    plain_min: int  # least memory for plain decoding at min_ctx
    spec_min: int  # least memory that still keeps speculation

    def describe(self) -> str:
        draft = f"{self.draft} (up to {self.tree_nodes} verify nodes)" if self.draft else "none (plain decoding)"
        return "\n".join([
            f"budget {fmt(self.budget)}: backend {self.backend}, context {self.n_ctx}, KV {self.kv_type}, "
            f"batch {self.n_batch}, drafter {draft}",
            "predicted footprint:", self.footprint.table(),
            f"lower bounds: plain decoding {fmt(self.plain_min)}, with speculation {fmt(self.spec_min)}",
        ])


def fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def parse_size(text: str) -> int:
    """'1.5GB', '800MB', '2GiB', '1073741824' -> bytes (GB and GiB are both read as powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read the memory size {text!r}; write e.g. 1.5GB or 800MB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _fits(fp: Footprint, budget: int) -> bool:
    return fp.total <= budget * (1 - SAFETY)


def plan(model: str | Path | ModelShape, budget: int, want_ctx: int = 4096, min_ctx: int = 512,
         draft: str | None = None, backend: str = "llama.cpp", draft_bytes: DraftBytes | int = 0) -> Plan:
    """Choose context, KV type, batch and drafter for ``budget`` bytes, or raise ``BudgetError``.
    ``draft_bytes``: the drafter's declared memory for a context and KV type (the drafter declares it; a
    draft model's weights and KV cache grow with the context)."""
    shape = model if isinstance(model, ModelShape) else read_shape(model)
    min_ctx = min(min_ctx, want_ctx)
    kv_order = BACKEND_KV.get(backend, KV_ORDER)
    extra_of = draft_bytes if callable(draft_bytes) else (lambda ctx, kv: draft_bytes)

    def footprint(ctx: int, kv: str, batch: int, spec: bool) -> Footprint:
        return run_footprint(shape, ctx, kv, batch, SPEC_TREE_NODES if spec else 1, extra_of(ctx, kv) if spec else 0)

    least = lambda spec: int(footprint(min_ctx, kv_order[-1], BATCHES[-1], spec).total / (1 - SAFETY)) + 1
    plain_min, spec_min = least(False), least(True)
    ctxs = []
    c = want_ctx
    while c >= min_ctx:
        ctxs.append(c)
        c //= 2
    for spec in ((True, False) if draft else (False,)):
        for ctx in ctxs:
            for kv in kv_order:
                for batch in BATCHES:
                    fp = footprint(ctx, kv, batch, spec)
                    if _fits(fp, budget):
                        return Plan(budget, backend, ctx, kv, batch, draft if spec else None,
                                    SPEC_TREE_NODES if spec else 1, fp, plain_min, spec_min)
    raise BudgetError(f"a budget of {fmt(budget)} is too small for this model: plain decoding needs at least "
                      f"{fmt(plain_min)} (context {min_ctx}, KV {kv_order[-1]}), speculation {fmt(spec_min)}")
