"""Multi-conversation prompt cache: KV states of recent prompt prefixes, restored when a request continues one.

A desktop app switches between chats. The backend's own cache only reuses the prefix it shares with the last
request, so each switch would re-evaluate the whole history. This cache keeps the states of recent
conversations (``Backend.save_state``, llama.cpp's per-sequence state or MLX's arrays) and, before a request's
prefill, loads the one sharing the longest prefix with the new prompt; prefill then evaluates only the rest.

States are saved lazily: the live cache is snapshotted only when the next request is about to overwrite a
worthwhile part of it (a switch to another conversation), so a conversation that simply goes on costs nothing.
A saved state that is (almost) a prefix of a newer one is dropped, and the least recently used states are
evicted to stay within ``max_entries`` and ``max_bytes`` (and, under a memory budget, the live headroom).
Room is made, and checked, before a state is copied (its size estimated from the KV bytes per token): a state
larger than the cap or the headroom is skipped without copying it or evicting anything. The cache never fails a
request: a state that cannot be saved is skipped, and one that cannot be restored is evicted and the prompt
evaluated from scratch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edgespec.backends.base import Backend, KVState, common_prefix


@dataclass
class PromptCacheConfig:
    max_entries: int = 8
    max_bytes: int = 1 << 30
    min_tokens: int = 32  # shorter states are not worth a slot
    min_gain: int = 8  # restore a state only if it saves evaluating at least this many more tokens
    slack: int = 8  # a state whose all but this many tokens prefix a newer one is superseded by it


@dataclass
class CacheStats:
    hits: int = 0  # requests that restored a saved state
    misses: int = 0  # requests that found nothing better than the live cache
    hit_tokens: int = 0  # prompt tokens restored from saved states
    saves: int = 0
    evictions: int = 0
    skipped: int = 0  # states not saved: larger than the cap or the memory headroom
    failures: int = 0  # saves or restores that failed (the request went on without them)


class PromptCache:
    """Implements ``runtime.PromptCache``; set it as ``Runtime.prompt_cache``. ``headroom``: bytes the process
    may still allocate (under a memory budget), checked before each save."""

    def __init__(self, cfg: PromptCacheConfig | None = None, headroom: Callable[[], int] | None = None):
        self.cfg = cfg or PromptCacheConfig()
        self.headroom = headroom
        self.entries: OrderedDict[int, KVState] = OrderedDict()  # least recently used first
        self.stats = CacheStats()
        self._next = 0
        self._lock = threading.Lock()  # entries are read by /metrics from another thread

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in list(self.entries.values()))

    def __len__(self) -> int:
        return len(self.entries)

    # ---- the runtime's hooks ---------------------------------------------------------------------
    def before(self, backend: Backend, prompt: list[int]) -> None:
        cfg = self.cfg
        live = common_prefix(backend.cached, prompt)
        best_key, best = None, live
        for key, e in self.entries.items():
            n = common_prefix(e.tokens, prompt)
            if n > best:
                best_key, best = key, n
        restore = best_key is not None and best >= live + cfg.min_gain
        state = self.entries[best_key] if restore else None  # taken now: saving below may evict its entry
        # what of the live cache this request destroys: everything when a state is restored, else the tail
        lost = len(backend.cached) - (0 if restore else live)
        if lost > cfg.slack and len(backend.cached) >= cfg.min_tokens and not self._covered(backend.cached):
            self._save(backend)
        if restore:
            try:
                backend.load_state(state)
            except Exception:  # a state that cannot be restored is dropped; prefill evaluates the whole prompt
                with self._lock:
                    self.entries.pop(best_key, None)
                self.stats.failures += 1
                backend.truncate(0)
                self.stats.misses += 1
                return
            with self._lock:
                if best_key in self.entries:
                    self.entries.move_to_end(best_key)
            self.stats.hits += 1
            self.stats.hit_tokens += best
        else:
            self.stats.misses += 1

    def after(self, backend: Backend) -> None:
        """Nothing to do: the live cache is saved only when a later request would overwrite it."""

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _covered(self, tokens: list[int]) -> bool:
        """Is (all but ``slack`` tokens of) ``tokens`` already saved?"""
        return any(common_prefix(e.tokens, tokens) >= len(tokens) - self.cfg.slack for e in self.entries.values())

    def _save(self, backend: Backend) -> None:
        """Keep the live cache's state if it fits: room is made and checked with its estimated size before it
        is copied; a state over the cap or the headroom is skipped without evicting anything."""
        cfg = self.cfg
        estimate = backend.memory().kv_bytes_per_token * len(backend.cached)
        with self._lock:
            for key in [k for k, e in self.entries.items()
                        if common_prefix(e.tokens, backend.cached) >= len(e.tokens) - cfg.slack]:
                del self.entries[key]  # superseded: the new state extends it
            # over the cap, or more than the headroom even if every kept state were freed: skipped as it is
            if cfg.max_entries < 1 or estimate > cfg.max_bytes or not self._room(estimate - self.nbytes):
                self.stats.skipped += 1
                return
            self._evict(estimate)
            if not self._room(estimate):
                self.stats.skipped += 1
                return
        try:
            state = backend.save_state()
        except Exception:  # the request goes on without it
            self.stats.failures += 1
            return
        with self._lock:
            self._evict(state.nbytes, headroom=False)  # the real size may differ; it is in memory already
            if state.nbytes > cfg.max_bytes or len(self.entries) >= cfg.max_entries:
                self.stats.skipped += 1
                return
            self.entries[self._next] = state
            self._next += 1
            self.stats.saves += 1

    def _evict(self, nbytes: int, headroom: bool = True) -> None:
        """Evict the least recently used states until one more of ``nbytes`` fits the entries, the cap and (with
        ``headroom``) the memory headroom."""
        while self.entries and (len(self.entries) >= self.cfg.max_entries or self.nbytes + nbytes > self.cfg.max_bytes
                                or (headroom and not self._room(nbytes))):
            self.entries.popitem(last=False)
            self.stats.evictions += 1

    def _room(self, nbytes: int) -> bool:
        return self.headroom is None or nbytes <= self.headroom()

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def figures(self) -> dict:
        s = self.stats
        return {"entries": len(self.entries), "bytes": self.nbytes, "max_bytes": self.cfg.max_bytes,
                "hits": s.hits, "misses": s.misses, "hit_tokens": s.hit_tokens, "saves": s.saves,
                "evictions": s.evictions, "skipped": s.skipped, "failures": s.failures}


def budget_cap(rt, fraction: float = 1.0) -> int | None:
    """Bytes the prompt cache may plan for under the runtime's memory budget: what the plan leaves free
    (the budget less its safety margin and the predicted footprint), or None without a budget."""
    plan = rt.plan
    if plan is None:
        return None
    from edgespec.memory.planner import SAFETY

    return max(0, int((plan.budget * (1 - SAFETY) - plan.footprint.total) * fraction))


def live_headroom(rt) -> Callable[[], int] | None:
    """Bytes the process may still allocate under the budget's live guard (None without a budget)."""
    guard = rt.controller.memory
    if guard is None:
        return None
    from edgespec.memory.live import rss_bytes

    return lambda: guard.limit - rss_bytes()
