"""The default drafter: every source that can pay, one tree per step, plain decoding where none does.

Sources, cheapest and surest first: a caller's prediction (per request), the context (the suffix drafter: what
the model has already seen and said, in this request and earlier ones) and a learned head (ReDrafter) on the
target's hidden state. Each step every cheap source proposes a tree with its calibrated acceptance chances
(``DraftTree.p``), and the tree with the largest expected gain at the measured verify costs (``TreeShape.gain``:
accepted tokens expected, less the price of the extra verify rows, in plain steps) is kept; with no positive gain
the step is plain decoding.

The head costs a beam search (a few ms) and needs the target's hidden state, so it is on probation
(``Probation``): it is asked only while its measured gain per attempt is positive, and otherwise now and then
(the gap between probes doubling up to ``most`` steps). While it is not asked, no hidden state is requested
(``needs_hidden`` is read before every step) and the step runs as plain decoding does. ``head_pays`` tells the
runtime whether the head has shown that it pays on this machine (the condition for adapting it online).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgespec.models.drafting.drafter import DraftContext, Drafter, DraftTree, TreeShape, VerifyResult


@dataclass
class Probation:
    """Whether to ask a dear source this step: while its measured gain per attempt (an EMA, in plain steps)
    is positive, every step; otherwise every ``gap`` steps, the gap doubling after each unpaid probe."""

    every: int = 16
    most: int = 256
    alpha: float = 0.2
    min_attempts: int = 16  # attempts before ``pays`` may say yes
    value: float = 0.0
    attempts: int = 0
    _gap: int = 16
    _wait: int = 0

    def __post_init__(self):
        self._gap = self.every

    def peek(self) -> bool:
        """Will ``tick`` say yes at the next step?"""
        return self.value > 0 or self._wait + 1 >= self._gap

    def tick(self) -> bool:
        """One more step: should the source be asked now? (It stays due until ``asked``.)"""
        if self.value > 0:
            return True
        self._wait += 1
        return self._wait >= self._gap

    def asked(self) -> None:
        """The source was asked: while it does not pay, the next probe comes after twice the gap."""
        if self.value <= 0:
            self._wait, self._gap = 0, min(2 * self._gap, self.most)

    def observe(self, gain: float) -> None:
        """What one attempt gained (accepted tokens less its verify rows and drafting time, in plain steps)."""
        self.attempts += 1
        self.value = (1 - self.alpha) * self.value + self.alpha * gain if self.attempts > 1 else gain
        if self.value > 0:
            self._gap, self._wait = self.every, 0

    def pays(self) -> bool:
        return self.attempts >= self.min_attempts and self.value > 0


class AutoDrafter:
    name = "auto"
    self_gating = True  # the controller prices every node; each source keeps what pays
    default_width = 1

    def __init__(self, sources: list[Drafter], head: Drafter | None = None, gate: Probation | None = None):
        self.sources = list(sources)  # cheap, self-gating sources (prediction, context n-grams)
        self.head = head  # a ReDrafter in self-gating mode, on probation
        self.gate = gate or Probation()
        self.max_depth = max([d.max_depth for d in self.sources] + ([head.max_depth] if head else []))
        self._pending: tuple[DraftTree, float, float] | None = None  # the head's last tree, its cost, draft s

    @property
    def needs_hidden(self) -> bool:
        """The next step may ask the head: the target must return its hidden state."""
        return self.head is not None and self.gate.peek()

    def with_sources(self, first: list[Drafter]) -> AutoDrafter:
        """The same drafter with per-request sources (a prediction) asked first; the rest is shared. A shared
        source that indexes text (the suffix drafter's ``expect``) also gets the predicted tokens."""
        predicted = [d.pred for d in first if isinstance(getattr(d, "pred", None), list)]
        for src in self.sources:
            if predicted and hasattr(src, "expect"):
                src.expect(predicted)
        return AutoDrafter(first + self.sources, self.head, self.gate)

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        best, best_gain = DraftTree(), 0.0
        for src in self.sources:
            tree = src.propose(ctx, shape)
            gain = shape.gain(tree)
            if gain > best_gain:
                best, best_gain = tree, gain
        self._pending = None
        if self.head is not None and self.gate.tick() and ctx.hidden is not None:
            self.gate.asked()
            t0 = time.perf_counter()
            tree = self.head.propose(ctx, shape)
            draft_s = time.perf_counter() - t0
            cost = sum(shape.cost(k) for k in range(len(tree.tokens)))
            self._pending = (tree, cost, draft_s / shape.step_s if shape.step_s else 0.0)
            gain = shape.gain(tree)
            if gain > best_gain:
                best = tree
        return best

    def observe(self, result: VerifyResult) -> None:
        for src in self.sources:
            src.observe(result)  # each learns from its own tree only (it ignores another's)
        if self.head is None:
            return
        self.head.observe(result)  # records examples for adaptation whenever hidden states came back
        if self._pending is not None:
            tree, cost, draft = self._pending
            used = result.tree is tree
            # the head's proposal was verified: its accepted tokens less its rows; else what drafting it cost
            self.gate.observe((len(result.accepted) - cost if used else 0.0) - draft)
            self._pending = None

    def head_pays(self) -> bool:
        return self.head is not None and self.gate.pays()

    def reset(self) -> None:
        for src in self.sources:
            src.reset()
        if self.head is not None:
            self.head.reset()
        self._pending = None

    def footprint(self) -> dict[str, int]:
        parts = [d.footprint() for d in self.sources + ([self.head] if self.head else [])]
        return {"now": sum(p["now"] for p in parts), "max": sum(p["max"] for p in parts)}

    def close(self) -> None:
        for d in self.sources + ([self.head] if self.head else []):
            d.close()
