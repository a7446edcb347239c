"""Suffix drafting (SuffixDecoding, Oliaro et al. 2025): draft from everything the model has already seen and said.

Two kinds of ``SuffixIndex``: one over this request (prompt and output so far, plus a caller's prediction and the
prompt's other spellings, ``views.JsonViews``, in indexes of their own) and one over earlier requests of the same
runtime (their prompts and outputs, at most ``history_tokens`` tokens, the least recently used request out first),
optionally kept on disk (``draft_history``).

An index keeps its tokens in one flat list (each document after a -1) and maps the hash of every n-gram (n in
``KEYS``) to its most recent end positions. A proposal looks up the longest key the context's suffix hits, extends
each occurrence's match backwards (up to ``max_match`` tokens) and grows a tree best-first from the tokens that
followed the occurrences: a child's raw probability is its share of its parent's occurrences (the counts), a node
is kept while the raw probability of its path is at least ``min_token_prob``, and a draft has at most
``max_spec_factor x match length`` nodes. Each node's chance of acceptance is calibrated online (``Calibration``:
the rate at which the target accepted nodes of the same bucket of raw probability, support, context length and
index), and ``TreeShape.keep`` keeps the best-first prefix with the largest expected gain at the measured verify
costs. Drafts are deterministic (``q`` None): greedy output is the target's own, sampling keeps its distribution.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult
from edgespec.models.drafting.redrafter import save_npz_atomic

KEYS = (1, 2, 4, 8)  # n-gram lengths indexed
MAX_LEAVES = 8  # the llama.cpp backend verifies trees of at most 8 leaves
BYTES_PER_TOKEN = 400  # an index's resident bytes per indexed token, measured by scripts/suffix_overhead.py
FORMAT_VERSION = 2
SOURCES = ("request", "prediction", "history", "view")


class SuffixIndex:
    """Token documents with the most recent end positions of each n-gram. ``max_tokens``: evict the least
    recently used documents (``touch``) beyond this many tokens (None: unbounded)."""

    def __init__(self, max_tokens: int | None = None, max_positions: int = 32):
        self.max_tokens = max_tokens
        self.max_positions = max_positions
        self.clear()

    def clear(self) -> None:
        self.tokens: list[int] = []  # every document after a -1; evicted ones overwritten with -1
        self.keys: dict[int, list[int]] = {}  # hash of an n-gram -> its end positions, oldest first
        self.docs: OrderedDict[int, tuple[int, int]] = OrderedDict()  # id -> (start, end), least recently used first
        self._starts: list[int] = []  # document starts in position order, and their ids
        self._ids: list[int] = []
        self._next = 0
        self.live = 0  # tokens in documents not evicted
        self.dead = 0

    def open(self) -> int:
        """Start a new (last) document; ``append`` extends it. Returns its id."""
        self.tokens.append(-1)
        doc, self._next = self._next, self._next + 1
        start = len(self.tokens)
        self._starts.append(start)
        self._ids.append(doc)
        self.docs[doc] = (start, start)
        return doc

    def append(self, tokens: list[int]) -> None:
        """Extend the last document, indexing each new end position."""
        doc = self._ids[-1]
        start = self._starts[-1]
        toks, keys, most = self.tokens, self.keys, self.max_positions
        for t in tokens:
            toks.append(t)
            end = len(toks)
            for n in KEYS:
                if end - n < start:
                    break
                k = hash(tuple(toks[end - n:end]))
                lst = keys.get(k)
                if lst is None:
                    keys[k] = [end]
                else:
                    lst.append(end)
                    if len(lst) > most:
                        del lst[0]
        self.docs[doc] = (start, len(toks))
        self.live += len(tokens)

    def add(self, tokens: list[int]) -> int:
        """A whole document (its last ``max_tokens`` tokens), then least recently used ones out. Returns its id."""
        if self.max_tokens is not None:
            tokens = tokens[-self.max_tokens:]
        doc = self.open()
        self.append(tokens)
        self._evict()
        return doc

    def touch(self, doc: int) -> None:
        """``doc`` was just used: it is evicted last."""
        if doc in self.docs:
            self.docs.move_to_end(doc)

    def doc_at(self, pos: int) -> int:
        return self._ids[bisect_right(self._starts, pos) - 1]

    def documents(self) -> list[list[int]]:
        """The live documents, least recently used first."""
        return [self.tokens[s:e] for s, e in self.docs.values()]

    def _evict(self) -> None:
        if self.max_tokens is None:
            return
        while self.live > self.max_tokens and len(self.docs) > 1:
            _, (s, e) = self.docs.popitem(last=False)
            self.tokens[s:e] = [-1] * (e - s)  # stale positions no longer match anything
            self.live -= e - s
            self.dead += e - s
        if self.dead > self.live:  # rebuild without the evicted tokens and their positions
            docs = self.documents()
            self.clear()
            for d in docs:
                self.open()
                self.append(d)

    def match(self, context: list[int], max_match: int) -> list[tuple[int, int]]:
        """(end position, match length) of the most recent occurrences of the longest indexed n-gram ending the
        context that have a continuation, each match extended backwards up to ``max_match`` tokens."""
        toks = self.tokens
        top = min(max_match, len(context))
        for n in reversed(KEYS):
            if n > top:
                continue
            lst = self.keys.get(hash(tuple(context[-n:])))
            if not lst:
                continue
            out, seen = [], set()
            for e in reversed(lst):
                if e >= len(toks) or toks[e] < 0 or e in seen:
                    continue  # no continuation (the context's own end, or a document's)
                seen.add(e)
                m = 0
                while m < top and toks[e - 1 - m] == context[-1 - m]:  # toks[0] is -1: the loop stops there
                    m += 1
                if m >= n:  # else a hash collision, or an evicted document
                    out.append((e, m))
            if out:
                return out
        return []

    def nbytes(self) -> int:
        return BYTES_PER_TOKEN * len(self.tokens)


CTX_EDGES = (3, 6, 12)  # context length buckets: 1-2, 3-5, 6-11, 12+
RAW_EDGES = (0.3, 0.55, 0.8, 0.999)  # raw probability buckets
SUPPORT_EDGES = (2, 5)  # occurrences behind the estimate: 1, 2-4, 5+
N_BINS = len(SOURCES) * 4 * 5 * 3


# a node's acceptance before anything is observed: its raw probability, discounted for a short context and for
# few occurrences
CTX_PRIOR = (0.4, 0.6, 0.8, 0.9)
SUPPORT_PRIOR = (0.85, 0.95, 1.0)


@dataclass
class Calibration:
    """Per bin (index, context length, raw probability, support): the rate at which the target accepted the
    nodes it tested, decayed (``decay`` per observation), pulled towards ``prior`` with weight ``weight``."""

    weight: float = 4.0
    decay: float = 0.98
    hits: list[float] = field(default_factory=lambda: [0.0] * N_BINS)
    trials: list[float] = field(default_factory=lambda: [0.0] * N_BINS)

    @staticmethod
    def bin(src: int, ctx_len: int, raw: float, support: int) -> tuple[int, float]:
        """The bin of a node, and its prior."""
        c, r, s = bisect_right(CTX_EDGES, ctx_len), bisect_right(RAW_EDGES, raw), bisect_right(SUPPORT_EDGES, support)
        return ((src * 4 + c) * 5 + r) * 3 + s, raw * CTX_PRIOR[c] * SUPPORT_PRIOR[s]

    def rate(self, b: int, base: float) -> float:
        return (self.hits[b] + self.weight * base) / (self.trials[b] + self.weight)

    def update(self, b: int, hit: bool) -> None:
        self.hits[b] = self.decay * self.hits[b] + float(hit)
        self.trials[b] = self.decay * self.trials[b] + 1.0

    def forget(self, b: int, by: float) -> None:
        """Move a bin back towards its prior (a bin that stopped drafting gets another chance)."""
        self.hits[b] *= 1 - by
        self.trials[b] *= 1 - by


@dataclass
class SuffixConfig:
    max_match: int = 32  # longest suffix matched
    max_spec_factor: float = 1.0  # a draft has at most factor x match length (+ offset) nodes
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1  # raw path probability below which a node is not drafted
    max_positions: int = 32  # most recent occurrences kept per n-gram
    history_tokens: int = 65536  # bound of the cross-request index
    overlap: int = 16  # tokens of context kept before what an archived request adds to the one before it
    recover: float = 0.02  # per step a bin's proposal is not drafted, it moves back this far to its prior


@dataclass
class _Node:
    token: int
    parent: int
    p: float  # calibrated chance that the whole path is accepted
    bin: int  # its calibration bin


class SuffixDrafter:
    name = "suffix"
    needs_hidden = False
    self_gating = True
    max_depth = 16
    default_width = 4

    def __init__(self, cfg: SuffixConfig | None = None, history: str | os.PathLike | None = None, key: str = "",
                 context_tokens: int = 4096, views: Callable[[list[int]], list[list[int]]] | None = None):
        self.cfg = cfg or SuffixConfig()
        self.views = views  # other spellings of a prompt's text (``views.JsonViews``), indexed per request
        self.path = Path(history).expanduser() if history else None
        self.key = key  # the model's weights: a history saved for others is not used
        self.context_tokens = context_tokens
        self.calibration = Calibration()
        self.global_index = SuffixIndex(self.cfg.history_tokens, self.cfg.max_positions)
        self.notices: list[str] = []
        if self.path is not None:
            self._load()
        self._archived: list[int] = []  # the last request archived (the next one often extends it)
        self._expected: list[list[int]] = []  # predictions for the next request
        self._last: tuple[DraftTree, list[_Node], list[int]] | None = None
        self.request_index = SuffixIndex(None, self.cfg.max_positions)
        self.prediction_index = SuffixIndex(None, self.cfg.max_positions)
        self.view_index = SuffixIndex(None, self.cfg.max_positions)
        self._view_docs: list[list[int]] = []  # what the view index holds
        self.history: list[int] = []
        self.reset()

    # ---- per request ------------------------------------------------------------------------------------
    def expect(self, predictions: list[list[int]]) -> None:
        """Predicted outputs of the next request (indexed from its ``reset``)."""
        self._expected = [list(p) for p in predictions if p]

    def reset(self) -> None:
        """A new request: the last one goes into the cross-request index, this one starts empty."""
        self._archive()
        self.history = []
        self.request_index = SuffixIndex(None, self.cfg.max_positions)
        self.prediction_index = SuffixIndex(None, self.cfg.max_positions)
        for p in self._expected:
            self.prediction_index.add(p)
        self._expected = []
        self._last = None

    def _archive(self) -> None:
        h = self.history
        if not h:
            return
        same = 0
        for a, b in zip(h, self._archived, strict=False):
            if a != b:
                break
            same += 1
        if len(h) - same > 0:  # what this request added to the last one, with a little context before it
            self.global_index.add(h[max(0, same - self.cfg.overlap):])
        self._archived = h
        self.history = []

    def _sync(self, cached: list[int], root: int) -> None:
        """Bring the request index up to ``cached + [root]``: the new tokens appended, or all indexed again when
        the history was rewritten (another prompt, or a root that changed without a commit)."""
        h, n = self.history, len(self.history)
        if n and len(cached) >= n and cached[n - 1] == h[-1] and (n < 2 or cached[n - 2] == h[-2]):
            new = cached[n:] + [root]  # the old root was committed
        elif n and len(cached) == n - 1 and h[-1] == root and (n < 2 or cached[n - 2] == h[-2]):
            return  # nothing new
        else:
            self.history, self.request_index = [], SuffixIndex(None, self.cfg.max_positions)
            self.request_index.open()
            new = cached + [root]
            if self.views is not None:
                self._index_views(cached)
        self.history.extend(new)
        self.request_index.append(new)

    def _index_views(self, prompt: list[int]) -> None:
        """Index the other spellings of a new prompt's text: only the new ones when the prompt extends the last
        (a conversation's next turn), all again otherwise."""
        docs = self.views(prompt)
        old = self._view_docs
        if docs[:len(old)] != old:
            self.view_index, old = SuffixIndex(None, self.cfg.max_positions), []
        for doc in docs[len(old):]:
            self.view_index.add(doc)
        self._view_docs = docs

    # ---- drafting -------------------------------------------------------------------------------------------
    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        self._sync(ctx.cached, ctx.root)
        self._last = None
        best: tuple[float, DraftTree, list[_Node], list[int]] | None = None
        own = 0  # the longest match in the request's own spelling
        for src, index in enumerate((self.request_index, self.prediction_index, self.global_index, self.view_index)):
            if not index.live:
                continue
            occ = index.match(self.history, self.cfg.max_match)
            if not occ:
                continue
            length = max(m for _, m in occ)
            if src == 0:
                own = length
            elif src == 3 and length <= own:  # another spelling counts where it matches more of the context
                continue
            nodes, first = self._grow(index, [e for e, m in occ if m == length], length, src, shape)
            keep = shape.keep([n.p for n in nodes])
            if not keep:  # not worth its rows: decode plainly, and let the bin drift back to its prior
                if first >= 0:
                    self.calibration.forget(first, self.cfg.recover)
                continue
            nodes = nodes[:keep]
            tree = DraftTree([n.token for n in nodes], [n.parent for n in nodes], None, [n.p for n in nodes])
            gain = shape.gain(tree)
            if best is None or gain > best[0]:
                docs = sorted({index.doc_at(e) for e, m in occ if m == length}) if src == 2 else []
                best = (gain, tree, nodes, docs)
        if best is None:
            return DraftTree()
        _, tree, nodes, docs = best
        self._last = (tree, nodes, docs)
        return tree

    def _grow(self, index: SuffixIndex, ends: list[int], length: int, src: int,
              shape: TreeShape) -> tuple[list[_Node], int]:
        """Best-first tree from the continuations of the occurrences ending at ``ends`` (parents first, by
        calibrated path probability), and the bin of its most likely first node (-1: none)."""
        cfg, cal, toks = self.cfg, self.calibration, index.tokens
        budget = min(shape.max_nodes, math.ceil(cfg.max_spec_factor * length + cfg.max_spec_offset))
        width = max(1, min(shape.width, MAX_LEAVES))
        n_toks = len(toks)
        # no node can pay once its chance is below every cost from its place on (chances only fall)
        floor = [min(shape.node_cost[min(k, len(shape.node_cost) - 1):] or (0.0,)) for k in range(budget)] \
            if shape.node_cost else [0.0] * budget
        heap: list = []
        tie = 0

        def push(positions: list[int], parent: int, depth: int, p: float, raw: float) -> None:
            nonlocal tie
            counts = Counter([toks[q] for q in positions if q < n_toks])
            counts.pop(-1, None)
            support = sum(counts.values())
            for tok, c in counts.most_common(width):
                r = c / support
                if raw * r < cfg.min_token_prob:
                    break
                b, base = cal.bin(src, length + depth - 1, r, support)
                pp = p * cal.rate(b, base)
                nxt = [q + 1 for q in positions if q < n_toks and toks[q] == tok]
                tie += 1
                heapq.heappush(heap, (-pp, tie, tok, parent, depth, raw * r, b, nxt))

        push(ends, -1, 1, 1.0, 1.0)
        nodes: list[_Node] = []
        kids = [0]  # children of the root, then of each node
        leaves = 0
        first = heap[0][6] if heap else -1
        while heap and len(nodes) < budget:
            negp, _, tok, parent, depth, raw, b, nxt = heapq.heappop(heap)
            if -negp < floor[len(nodes)]:
                break
            slot = parent + 1
            if kids[slot] >= width or (kids[slot] > 0 and leaves >= MAX_LEAVES):
                continue
            leaves += 1 if kids[slot] > 0 or parent < 0 else 0
            kids[slot] += 1
            nodes.append(_Node(tok, parent, -negp, b))
            kids.append(0)
            if depth < shape.depth:
                push(nxt, len(nodes) - 1, depth + 1, -negp, raw)
        return nodes, first

    def observe(self, result: VerifyResult) -> None:
        """Calibrate the bins of the nodes the target tested (children of the root and of accepted nodes)."""
        if self._last is None or self._last[0] is not result.tree:
            return
        tree, nodes, docs = self._last
        accepted = set(result.accepted)
        for i, n in enumerate(nodes):
            if n.parent < 0 or n.parent in accepted:
                self.calibration.update(n.bin, i in accepted)
        if accepted:
            for d in docs:
                self.global_index.touch(d)
        self._last = None

    # ---- persistence ----------------------------------------------------------------------------------------
    def _load(self) -> None:
        """The history file, when it exists and is for these weights; a corrupt one is discarded with a notice."""
        path = self.path
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                tokens, lengths, cal = z["tokens"], z["lengths"], z["calibration"]
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')}, not {FORMAT_VERSION}")
            if int(lengths.sum()) != len(tokens) or (len(tokens) and int(tokens.min()) < 0) or \
                    cal.shape != (2, N_BINS) or not np.isfinite(cal).all():
                raise ValueError("inconsistent contents")
        except Exception as e:  # noqa: BLE001  (any damage: start empty, never fail the load)
            self.notices.append(f"discarded the corrupt draft history {path} ({type(e).__name__}: {e})")
            return
        if meta.get("key") != self.key:
            self.notices.append(f"draft history {path} is for other model weights: starting an empty one")
            return
        start = 0
        for n in lengths.tolist():
            self.global_index.add(tokens[start:start + n].tolist())
            start += n
        self.calibration.hits, self.calibration.trials = cal[0].tolist(), cal[1].tolist()

    def save(self) -> None:
        """Write the cross-request index and the calibration atomically (a temporary file, fsync, a rename: a crash
        leaves the old file or the new one)."""
        if self.path is None:
            return
        docs = self.global_index.documents()
        arrays = {"meta": np.array(json.dumps({"version": FORMAT_VERSION, "key": self.key})),
                  "tokens": np.array([t for d in docs for t in d], np.int32),
                  "lengths": np.array([len(d) for d in docs], np.int64),
                  "calibration": np.array([self.calibration.hits, self.calibration.trials], np.float64)}
        save_npz_atomic(self.path, arrays)

    def footprint(self) -> dict[str, int]:
        now = sum(i.nbytes() for i in (self.request_index, self.prediction_index, self.global_index, self.view_index))
        return {"now": now, "max": max(now, declared_bytes(self.cfg, self.context_tokens))}

    def close(self) -> None:
        """Archive the request in progress and save the history, when it is kept on disk."""
        self._archive()
        if self.path is not None:
            try:
                self.save()
            except OSError as e:
                self.notices.append(f"could not save the draft history {self.path} ({e})")


def declared_bytes(cfg: SuffixConfig, n_ctx: int) -> int:
    """What the memory planner counts for a suffix drafter: a full cross-request index (with as many evicted
    tokens again, before they are compacted away), a request of ``n_ctx`` tokens and its prompt's views."""
    return BYTES_PER_TOKEN * (2 * cfg.history_tokens + 2 * n_ctx)
