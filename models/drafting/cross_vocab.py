"""Cross-vocabulary drafting (OmniDraft, 2507.02659): one small draft model for a target with another tokenizer.

Text crosses between the vocabularies through a ``Translator``:

* draft -> target: at each position the longest run of draft tokens that the n-gram cache has seen
  spell exactly one target token (or a short run of them) becomes that; otherwise a draft token whose
  bytes are also a target token maps directly (the vocabulary intersection); otherwise translation stops.
* target -> draft: the target's committed text is re-tokenized by the draft tokenizer incrementally,
  from a lookbehind window of the last few draft tokens (``DraftText``), so a new token costs a short
  re-tokenization and the draft model's KV cache keeps its common prefix.
* The cache learns online from the text the target commits: wherever both tokenizations share a
  boundary, the draft run and the target run between two consecutive shared boundaries spell the same
  bytes, and the pair is stored (runs of up to ``max_run`` tokens; a draft token that straddles target
  boundaries, like smollm2's "\n   " against qwen's "):\n" + "   ", is covered this way).
  It is bounded by ``capacity`` entries with least-recently-used eviction.

Exactness. Greedy decoding is exact in every mode: the target verifies each proposal. Sampling is exact
too: in sampling mode the drafter uses the token-level intersection rule (the draft distribution
restricted to tokens whose strings exist in both vocabularies, renormalized, mapped 1:1 to target ids),
so ``q`` is a true distribution over target tokens and the engine's rejection sampling keeps the
target's distribution. Merged (n-gram) proposals are used in greedy mode only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict

import numpy as np

from edgespec.backends.base import Backend, common_prefix
from edgespec.models.drafting.draft_model import DraftModelDrafter
from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult

LOOKBEHIND = 4  # draft tokens re-tokenized again when text is appended


def vocab_bytes(backend: Backend) -> list[bytes]:
    """Every token's bytes (control tokens: empty)."""
    return [backend.token_bytes(i) for i in range(backend.info.n_vocab)]


def declared_cache_bytes(n_draft_vocab: int, capacity: int = 50_000) -> int:
    """The most a ``Translator`` holds: its direct map and a full span cache (``Translator.nbytes``)."""
    return 8 * n_draft_vocab + 150 * capacity


def declared_vocab_bytes(n_target_vocab: int, n_draft_vocab: int) -> int:
    """Peak bytes of both vocabularies' token-bytes tables (``vocab_bytes`` fills each backend's piece cache)
    and of the translator's byte-string index while it is built. Measured (RSS, qwen2.5-coder-0.5b target,
    smollm2-135m draft): the target's table +21.1 MiB (146 B a token), the draft's +5.0 MiB (107 B a token),
    the index +13.4 MiB at its peak (88 B a target token); 39.5 MiB at the peak, 240 and 110 B a token here."""
    return 240 * n_target_vocab + 110 * n_draft_vocab


class Translator:
    """Draft-token runs to target tokens: the n-gram cache, then the direct (intersection) map."""

    def __init__(self, draft_bytes: list[bytes], target_bytes: list[bytes], max_run: int = 4, capacity: int = 50_000):
        by_bytes: dict[bytes, int] = {}
        for tid, b in enumerate(target_bytes):
            if b and b not in by_bytes:
                by_bytes[b] = tid
        self.direct = np.full(len(draft_bytes), -1, np.int64)  # draft id -> target id, -1: not shared
        for did, b in enumerate(draft_bytes):
            self.direct[did] = by_bytes.get(b, -1) if b else -1
        self.draft_bytes = draft_bytes
        self.max_run = max_run
        self.capacity = capacity
        self.cache: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        self.evictions = 0

    def learn(self, run: tuple[int, ...], targets: tuple[int, ...]) -> None:
        """Remember that draft tokens ``run`` spell exactly target tokens ``targets``."""
        if len(run) <= self.max_run and len(targets) <= self.max_run and (len(run) > 1 or len(targets) > 1):
            self.cache[run] = targets
            self.cache.move_to_end(run)
            if len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
                self.evictions += 1

    def translate(self, draft: list[int], merges: bool = True) -> list[tuple[int, int]]:
        """(target token, draft tokens consumed with it) for the longest translatable prefix of ``draft``.
        A cached run that spells several target tokens counts its draft tokens on the last of them."""
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(draft):
            hit = None
            if merges:
                for n in range(min(self.max_run, len(draft) - i), 0, -1):
                    key = tuple(draft[i:i + n])
                    hit = self.cache.get(key)
                    if hit is not None:
                        self.cache.move_to_end(key)
                        out += [(t, 0) for t in hit[:-1]] + [(hit[-1], n)]
                        i += n
                        break
            if hit is None:
                t = int(self.direct[draft[i]])
                if t < 0:
                    break
                out.append((t, 1))
                i += 1
        return out

    def nbytes(self) -> int:
        """Approximate resident bytes: the direct map plus ~150 bytes per cache entry (tuple, ints, dict slot)."""
        return self.direct.nbytes + 150 * len(self.cache)


class DraftText:
    """The draft tokenization of the target's committed text, kept up to date incrementally."""

    def __init__(self, draft: Backend, target: Backend, translator: Translator):
        self.draft, self.target, self.tr = draft, target, translator
        self.t_tokens: list[int] = []
        self.t_ends: list[int] = []  # byte offset where each target token ends
        self.text = bytearray()
        self.d_tokens: list[int] = []
        self.d_ends: list[int] = []

    def update(self, target_tokens: list[int]) -> list[int]:
        """Sync to ``target_tokens``; learn merges from the newly committed tokens; return the draft tokens."""
        k = common_prefix(self.t_tokens, target_tokens)
        valid = self.t_ends[k - 1] if k else 0
        del self.t_tokens[k:], self.t_ends[k:]
        del self.text[valid:]
        for t in target_tokens[k:]:
            self.text += self.target.token_bytes(t)
            self.t_tokens.append(t)
            self.t_ends.append(len(self.text))
        # keep draft tokens inside the unchanged text, minus a lookbehind window, at a character boundary
        n = len(self.d_ends)
        while n and self.d_ends[n - 1] > valid:
            n -= 1
        n = max(0, n - LOOKBEHIND)
        while n and (self.text[self.d_ends[n - 1]:self.d_ends[n - 1] + 1] or b"\x00")[0] & 0xC0 == 0x80:
            n -= 1
        del self.d_tokens[n:], self.d_ends[n:]
        cut = self.d_ends[-1] if n else 0
        tail = bytes(self.text[cut:]).decode("utf-8", errors="ignore")
        pos = cut
        for d in self.draft.tokenize(tail, add_special=False, parse_special=False) if tail else []:
            pos += len(self.tr.draft_bytes[d])
            self.d_tokens.append(d)
            self.d_ends.append(pos)
        self._learn(k)
        return self.d_tokens

    def _learn(self, first_new: int) -> None:
        """Store the minimal aligned spans (draft run = target run, same bytes, both boundaries shared) that
        end inside the newly committed target tokens from ``first_new`` on."""
        lo = self.t_ends[first_new - 1] if first_new else 0
        start = max(0, bisect_left(self.d_ends, lo) - 2 * self.tr.max_run)
        d_at = {e: start + i for i, e in enumerate(self.d_ends[start:])}
        t_prev, d_prev = None, None  # indices of the last shared boundary
        for j in range(max(0, first_new - self.tr.max_run), len(self.t_ends)):
            i = d_at.get(self.t_ends[j])
            if i is None:
                continue
            if t_prev is not None and self.t_ends[j] > lo:
                self.tr.learn(tuple(self.d_tokens[d_prev + 1:i + 1]), tuple(self.t_tokens[t_prev + 1:j + 1]))
            t_prev, d_prev = j, i


class CrossVocabDrafter:
    """A draft model with its own vocabulary drafting a chain of target tokens (see the module docstring)."""

    name = "cross-vocab"
    needs_hidden = False
    max_depth = 6
    default_width = 1
    # The controller gates it (acceptance EMA vs measured costs, with probes): syncing the draft model costs
    # a forward per step, which a self-gating drafter would pay even when it drafts nothing (0.76x here).
    self_gating = False

    def __init__(self, draft: Backend, target: Backend, capacity: int = 50_000, seed: int = 0):
        self.draft = DraftModelDrafter(draft)
        self.translator = Translator(vocab_bytes(draft), vocab_bytes(target), capacity=capacity)
        self.text = DraftText(draft, target, self.translator)
        self.target_vocab = target.info.n_vocab
        self.eog = draft.info.eog
        self.bos = [draft.info.bos] if draft.info.add_bos and draft.info.bos is not None else []
        self.rng = np.random.default_rng(seed)
        self.stats = {"proposed": 0, "merged": 0}

    @property
    def backend(self) -> Backend:
        return self.draft.backend

    def reset(self) -> None:
        pass  # the draft text and cache are synced by common prefix at every proposal

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        depth = min(shape.depth, shape.max_nodes)
        if depth <= 0:
            return DraftTree()
        prefix = self.bos + self.text.update(list(ctx.cached) + [ctx.root])
        if len(prefix) + 2 * depth + 2 > self.backend.n_ctx:
            return DraftTree()
        if ctx.sampling:
            return self._propose_sampled(prefix, depth)
        # adaptive length: draft while the path probability (product of the draft's top-1 probabilities)
        # can still pay for a node, then keep the translated tokens that do (TreeShape.worth)
        floor = min(shape.node_cost) if shape.node_cost else 0.0
        logits = self.draft.sync(prefix)
        drafted: list[int] = []
        path: list[float] = []  # path probability after each draft token
        prob = 1.0
        for _ in range(2 * depth):  # draft tokens are often shorter than target tokens
            tok = int(np.argmax(logits))
            z = logits - logits[tok]
            prob *= 1.0 / float(np.exp(z).sum())
            if tok in self.eog or prob < floor:
                break
            drafted.append(tok)
            path.append(prob)
            if len(drafted) < 2 * depth:
                logits = self._advance(tok)
        toks: list[int] = []
        used = 0
        for t, n in self.translator.translate(drafted):
            used += n
            if len(toks) >= depth or not shape.worth(path[max(used, 1) - 1], len(toks)):
                break
            toks.append(t)
            self.stats["merged"] += n > 1
        self.stats["proposed"] += len(toks)
        return DraftTree(toks, list(range(-1, len(toks) - 1)))

    def _advance(self, tok: int) -> np.ndarray:
        out = self.backend.forward([tok], [-1], want_hidden=False)
        self.backend.commit([0])
        return out.logits[0]

    def _propose_sampled(self, prefix: list[int], depth: int) -> DraftTree:
        """Token-level intersection: sample from the draft distribution restricted to shared tokens."""
        shared = self.translator.direct >= 0
        logits = self.draft.sync(prefix)
        toks, qs = [], []
        for d in range(depth):
            z = np.where(shared, logits.astype(np.float64), -np.inf)
            p = np.exp(z - z.max())
            p /= p.sum()
            tok = int(self.rng.choice(len(p), p=p))
            q = np.zeros(self.target_vocab)
            np.add.at(q, self.translator.direct[shared], p[shared])
            toks.append(int(self.translator.direct[tok]))
            qs.append(q)
            if d + 1 < depth:
                logits = self._advance(tok)
        return DraftTree(toks, list(range(-1, len(toks) - 1)), qs)

    def observe(self, result: VerifyResult) -> None:
        pass  # the cache learns from committed text in DraftText.update

    def footprint(self) -> dict[str, int]:
        m = self.backend.memory()
        cache = self.translator.nbytes()
        return {"now": m.weights_bytes + m.kv_used_bytes + cache, "max": m.weights_bytes + m.kv_reserved_bytes + cache,
                "cache_entries": len(self.translator.cache), "cache_bytes": cache}

    def close(self) -> None:
        self.draft.close()
