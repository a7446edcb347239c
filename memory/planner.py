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

from edgespec.memory.footprint import (
    DRAFT,
    RUNTIME_OVERHEAD,
    Footprint,
    MiB,
    ModelShape,
    read_shape,
    run_footprint,
)

SAFETY = 0.05
KV_ORDER = ("f16", "q8_0", "q4_0")
BATCHES = (512, 128, 32)
SPEC_TREE_NODES = 4  # verify nodes planned for (the live guard caps the tree to what fits at run time)
BACKEND_KV = {"mlx": ("f16",)}  # KV types a backend can hold (default: all of KV_ORDER)
# (n_ctx, kv_type, n_batch) -> the drafter's declared parts ({name: bytes}) or bytes: the core passes what the
# drafter declares (memory/ never imports a drafter); a draft model's weights, KV cache and buffers grow with them
DraftBytes = Callable[[int, str, int], "dict[str, int] | int"]


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
    wanted: str | None = None  # the drafter asked for (``draft`` is None when it did not fit)
    smallest_spec: Footprint | None = None  # the footprint of the smallest configuration with that drafter

    def describe(self) -> str:
        draft = f"{self.draft} (up to {self.tree_nodes} verify nodes)" if self.draft else "none (plain decoding)"
        lines = [f"budget {fmt(self.budget)}: backend {self.backend}, context {self.n_ctx}, KV {self.kv_type}, "
                 f"batch {self.n_batch}, drafter {draft}",
                 "predicted footprint:", self.footprint.table()]
        if self.wanted and not self.draft and self.smallest_spec is not None:
            parts = {k: v for k, v in self.smallest_spec.parts.items() if k.startswith(DRAFT)}
            lines += [f"speculation dropped: drafter {self.wanted} does not fit. With it the smallest plan needs "
                      f"{fmt(self.spec_min)}",
                      f"(the budget less {SAFETY:.0%} slack is {fmt(int(self.budget * (1 - SAFETY)))}); the drafter's "
                      "parts in that plan:"]
            lines += [f"  {k:<22} {v / MiB:9.1f} MiB" for k, v in parts.items()]
        lines.append(f"lower bounds: plain decoding {fmt(self.plain_min)}"
                     + (f", with speculation {fmt(self.spec_min)}" if self.wanted else ""))
        return "\n".join(lines)


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
         draft: str | None = None, backend: str = "llama.cpp", draft_bytes: DraftBytes | int = 0,
         overhead: int = RUNTIME_OVERHEAD) -> Plan:
    """Choose context, KV type, batch and drafter for ``budget`` bytes, or raise ``BudgetError``.
    ``draft_bytes``: the drafter's declared parts (or bytes) for a context, KV type and batch, as the drafter
    declares them (a draft model's weights, KV cache and buffers; a head and its online adaptation).
    ``overhead``: what the process holds before the model loads (``RUNTIME_OVERHEAD`` at least)."""
    shape = model if isinstance(model, ModelShape) else read_shape(model)
    if want_ctx < 16:
        raise ValueError(f"the context must be at least 16 tokens, not {want_ctx}")
    min_ctx = max(16, min(min_ctx, want_ctx))
    kv_order = BACKEND_KV.get(backend, KV_ORDER)
    parts_of = draft_bytes if callable(draft_bytes) else (lambda ctx, kv, batch: draft_bytes)

    def footprint(ctx: int, kv: str, batch: int, spec: bool) -> Footprint:
        return run_footprint(shape, ctx, kv, batch, SPEC_TREE_NODES if spec else 1,
                             parts_of(ctx, kv, batch) if spec else 0, overhead)

    smallest = lambda spec: footprint(min_ctx, kv_order[-1], min(BATCHES[-1], min_ctx), spec)
    least = lambda spec: int(smallest(spec).total / (1 - SAFETY)) + 1
    plain_min, spec_min = least(False), least(bool(draft))
    ctxs = []
    c = want_ctx
    while c >= min_ctx:
        ctxs.append(c)
        c //= 2
    if ctxs[-1] != min_ctx:
        ctxs.append(min_ctx)
    for spec in ((True, False) if draft else (False,)):
        for ctx in ctxs:
            for kv in kv_order:
                for batch in dict.fromkeys(min(b, ctx) for b in BATCHES):  # llama.cpp caps a batch at n_ctx
                    fp = footprint(ctx, kv, batch, spec)
                    if _fits(fp, budget):
                        return Plan(budget, backend, ctx, kv, batch, draft if spec else None,
                                    SPEC_TREE_NODES if spec else 1, fp, plain_min, spec_min, draft,
                                    smallest(True) if draft and not spec else None)
    raise BudgetError(f"a budget of {fmt(budget)} is too small for this model: plain decoding needs at least "
                      f"{fmt(plain_min)} (context {min_ctx}, KV {kv_order[-1]})"
                      + (f", speculation {fmt(spec_min)}" if draft else ""))
