"""Generation: prefill with prefix reuse, a token-step source (plain or speculative), and the driver that
turns steps into streamed text while enforcing EOS, stop strings, max tokens, cancellation and stats.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from edgespec.backends.base import Backend, ContextFullError, ForwardOut, StreamDecoder, common_prefix
from edgespec.sampling import SamplingParams, sample


class PromptTooLongError(ValueError):
    """The prompt does not fit the context window."""


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually evaluated (the rest came from the KV cache)
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""  # eos | stop | length | context | cancelled
    verifies: int = 0  # target forward passes after prefill
    drafted: int = 0  # draft nodes sent to verification
    accepted: int = 0  # draft tokens accepted
    accepted_per_depth: list[int] = field(default_factory=list)
    drafted_per_depth: list[int] = field(default_factory=list)
    draft_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Mean tokens committed per target forward (accepted drafts + the target's own token)."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0

    def line(self) -> str:
        s = (f"{self.generated_tokens} tokens, {self.tok_s:.1f} tok/s, TTFT {self.ttft_s * 1000:.0f} ms, "
             f"prompt {self.prompt_tokens} ({self.prefill_tokens} evaluated), finish: {self.finish_reason}")
        if self.drafted:
            s += f", {self.tokens_per_verify:.2f} tok/verify"
        return s

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(tok_s=self.tok_s, tokens_per_verify=self.tokens_per_verify)
        return d


def prefill(backend: Backend, prompt: list[int], stats: Stats, want_hidden: bool = False) -> ForwardOut:
    """Evaluate only what the cache lacks of ``prompt``; return the last prompt position's outputs."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= backend.n_ctx:
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens but the context holds {backend.n_ctx}; "
                                 "shorten it or load with a larger n_ctx")
    n = min(common_prefix(backend.cached, prompt), len(prompt) - 1)
    backend.truncate(n)
    stats.prompt_tokens, stats.prefill_tokens = len(prompt), len(prompt) - n
    return backend.prefill(prompt[n:], want_hidden=want_hidden)


def plain_steps(backend: Backend, first: ForwardOut, sp: SamplingParams, rng: np.random.Generator,
                stats: Stats) -> Iterator[list[int]]:
    """Plain decoding: one token per target forward."""
    logits = first.logits[-1]
    while True:
        tok = sample(logits, sp, rng)
        yield [tok]
        out = backend.forward([tok], [-1])
        backend.commit([0])
        stats.verifies += 1
        logits = out.logits[0]


class TextOut:
    """Incremental text with stop strings: never emits text that might turn out to start a stop string."""

    def __init__(self, backend: Backend, stop: tuple[str, ...]):
        self.dec = StreamDecoder(backend)
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.dec.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.dec.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            longest = max(map(len, self.stop))
            window_start = max(0, self.emitted - longest)
            hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            if not final:
                hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
                return self._take(len(self.text) - hold)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        chunk = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk


Cancel = threading.Event | Callable[[], bool] | None


def _cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


StepSource = Callable[[Backend, ForwardOut, SamplingParams, np.random.Generator, Stats], Iterator[list[int]]]


def stream(backend: Backend, prompt: list[int], cfg: GenerationConfig, stats: Stats,
           steps: StepSource = plain_steps, cancel: Cancel = None, out_tokens: list[int] | None = None,
           want_hidden: bool = False) -> Iterator[str]:
    """Generate from ``prompt`` and yield text chunks. ``stats`` is filled in as it goes.

    ``steps`` yields lists of new tokens (one for plain decoding, several per speculative step).
    ``want_hidden``: the steps need the target's hidden state at the last prompt position.
    Afterwards the cache holds ``prompt`` plus the generated tokens (the last one may be missing).

    While it runs, numpy's BLAS gets one thread: its worker threads (and OpenBLAS's spinning between
    calls) would take cores from llama.cpp (measured on 2 cores: a ReDrafter run at 0.78x of plain with
    the default BLAS threads, 0.96x with one).
    """
    with threadpool_limits(1, user_api="blas"):
        yield from _stream(backend, prompt, cfg, stats, steps, cancel, out_tokens, want_hidden)


def _stream(backend: Backend, prompt: list[int], cfg: GenerationConfig, stats: Stats, steps: StepSource,
            cancel: Cancel, out_tokens: list[int] | None, want_hidden: bool) -> Iterator[str]:
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.sampling.seed)
    first = prefill(backend, prompt, stats, want_hidden)
    t1 = time.perf_counter()
    stats.ttft_s = t1 - t0
    out = out_tokens if out_tokens is not None else []
    text = TextOut(backend, cfg.stop)
    eog = frozenset() if cfg.ignore_eos else backend.info.eog
    source = steps(backend, first, cfg.sampling, rng, stats)
    try:
        while not stats.finish_reason:
            if _cancelled(cancel):
                stats.finish_reason = "cancelled"
                break
            try:
                new = next(source)
            except ContextFullError:
                stats.finish_reason = "context"
                break
            for tok in new:
                if tok in eog:
                    stats.finish_reason = "eos"
                    break
                out.append(tok)
                chunk = text.push(tok)
                if chunk:
                    yield chunk
                if text.stopped:
                    stats.finish_reason = "stop"
                    break
                if len(out) >= cfg.max_tokens:
                    stats.finish_reason = "length"
                    break
        tail = text.finish()
        if tail:
            yield tail
    finally:
        source.close()
        t2 = time.perf_counter()
        stats.generated_tokens = len(out)
        stats.decode_s, stats.total_s = t2 - t1, t2 - t0
        if not stats.finish_reason:
            stats.finish_reason = "cancelled"
        backend.truncate(common_prefix(backend.cached, prompt + out))
