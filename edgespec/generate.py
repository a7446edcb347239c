"""Generation: prefill with prefix reuse, a token-step source (plain or speculative), and the driver that
turns steps into streamed text while enforcing EOS, stop strings, max tokens, cancellation and stats.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import ThreadpoolController

from edgespec.backends.base import (
    Backend,
    ContextFullError,
    ForwardOut,
    PrefillCancelled,
    StreamDecoder,
    common_prefix,
)
from edgespec.sampling import PositionRng, SamplingParams, sample
from edgespec.structured import Constraint


class PromptTooLongError(ValueError):
    """The prompt does not fit the context window."""


MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 512  # characters per stop string


def check_stop(stop) -> tuple[str, ...]:
    """``stop`` (a string or a sequence of them) as a tuple, or a ValueError: at most ``MAX_STOPS`` non-empty
    strings of at most ``MAX_STOP_CHARS`` characters each."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be non-empty strings, not {stop!r}"[:200])
    if len(stop) > MAX_STOPS:
        raise ValueError(f"stop must hold at most {MAX_STOPS} strings, not {len(stop)}")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise ValueError(f"stop strings must have at most {MAX_STOP_CHARS} characters, not {longest}")
    return stop


@dataclass
class GenerationConfig:
    max_tokens: int  # the request's (``options.Request``)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n_indent: int = 0  # after the first line, stop at a line indented less than this (``LineStop``)
    t_max_predict_ms: float = 0.0  # after this long generating, stop at the next newline (0: no limit)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, not {self.max_tokens!r}")
        self.stop = check_stop(self.stop)
        if isinstance(self.n_indent, bool) or not isinstance(self.n_indent, int) or self.n_indent < 0:
            raise ValueError(f"n_indent must be an integer >= 0, not {self.n_indent!r}")
        t = self.t_max_predict_ms
        if isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0:
            raise ValueError(f"t_max_predict_ms must be a number >= 0, not {t!r}")

    def line_stop(self) -> LineStop | None:
        if not self.n_indent and not self.t_max_predict_ms:
            return None
        return LineStop(self.n_indent, self.t_max_predict_ms / 1000)


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually evaluated (the rest came from the KV cache)
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""  # eos | stop | length | context | cancelled | indent | time (``LineStop``)
    verifies: int = 0  # target forward passes after prefill
    drafted: int = 0  # draft nodes sent to verification
    accepted: int = 0  # draft tokens accepted
    accepted_per_depth: list[int] = field(default_factory=list)
    drafted_per_depth: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    forced: int = 0  # tokens the grammar forced, appended without sampling and evaluated in one batch
    pruned: int = 0  # draft nodes the grammar rejected, cut before verification
    grammar_s: float = 0.0  # time in the grammar engine (masks, consuming tokens, validating drafts)

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


Cancel = threading.Event | Callable[[], bool] | None


def is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def prefill(backend: Backend, prompt: list[int], stats: Stats, want_hidden: bool = False,
            cancel: Cancel = None) -> ForwardOut:
    """Evaluate only what the cache lacks of ``prompt``; return the last prompt position's outputs.
    ``cancel`` is checked between prefill batches (``PrefillCancelled``)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= backend.n_ctx:
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens but the context holds {backend.n_ctx}; "
                                 "shorten it or load with a larger n_ctx")
    n = min(common_prefix(backend.cached, prompt), len(prompt) - 1)
    backend.truncate(n)
    stats.prompt_tokens, stats.prefill_tokens = len(prompt), len(prompt) - n
    check = None if cancel is None else (lambda: is_cancelled(cancel))
    return backend.prefill(prompt[n:], want_hidden=want_hidden, cancel=check)


def plain_steps(backend: Backend, first: ForwardOut, sp: SamplingParams, rng: PositionRng,
                stats: Stats, max_tokens: int, constraint: Constraint | None = None) -> Iterator[list[int]]:
    """Plain decoding: one token per target forward; the token at output position k is drawn with
    ``rng.at(k)``. Under a ``constraint`` each token is drawn from the grammar's masked, renormalized
    distribution (``functools.partial(plain_steps, constraint=...)`` is the step source)."""
    logits = first.logits[-1]
    pos = 0
    while True:
        tok = pick(logits, sp, rng, pos, constraint)
        pos += 1
        if constraint is not None:
            stats.grammar_s = constraint.grammar_s
        yield [tok]
        out = backend.forward([tok], [-1], want_hidden=False)
        backend.commit([0])
        stats.verifies += 1
        logits = out.logits[0]


def pick(logits: np.ndarray, sp: SamplingParams, rng: PositionRng, pos: int,
         constraint: Constraint | None = None) -> int:
    """The token at output position ``pos``: the target's argmax or its sample from ``rng.at(pos)``, under the
    grammar's mask when there is a ``constraint`` (which then consumes the token)."""
    if constraint is not None:
        logits = constraint.masked(logits)
    tok = sample(logits, sp, None if sp.greedy else rng.at(pos))
    if constraint is not None:
        constraint.consume([tok])
    return tok


class StopMatcher:
    """One stop string as a KMP automaton over the text: ``k`` is the length of the longest prefix of the
    string that the text read so far ends with, so each new character costs O(1) (amortized)."""

    def __init__(self, s: str):
        self.s = s
        self.fail = [0] * len(s)  # fail[i]: longest proper border of s[:i + 1]
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = self.fail[k - 1]
            if s[i] == s[k]:
                k += 1
            self.fail[i] = k
        self.k = 0

    def feed(self, text: str, start: int) -> int:
        """Read ``text[start:]``; the start of the first whole match ending there, or -1."""
        s, fail, k, n = self.s, self.fail, self.k, len(self.s)
        for i in range(start, len(text)):
            c = text[i]
            while k and c != s[k]:
                k = fail[k - 1]
            if c == s[k]:
                k += 1
                if k == n:
                    self.k = k
                    return i + 1 - n
        self.k = k
        return -1


class LineStop:
    """llama-server's stops for editor completions, over the answer's text. ``n_indent``: after the first line,
    a line whose indentation (spaces and tabs) is less than ``n_indent`` ends the answer, cut at that line's
    start (an empty line counts as not indented, as in llama-server). ``t_max_s``: once that many seconds have
    passed since generation started, the answer ends after its next newline. Each character is read once."""

    def __init__(self, n_indent: int = 0, t_max_s: float = 0.0):
        self.n_indent, self.t_max_s = n_indent, t_max_s
        self.start = time.perf_counter()  # made when generation starts (after the prompt)
        self.reason = ""  # indent | time, once it has cut
        self._line = -1  # start of the line whose indentation is still unknown (-1: none)
        self._seen = 0

    def cut(self, text: str) -> int | None:
        """Where the answer ``text`` (all of it so far) ends under these rules, or None."""
        for i in range(self._seen, len(text)):
            c = text[i]
            if self._line >= 0 and c not in " \t":
                if i - self._line < self.n_indent:
                    self.reason = "indent"
                    return self._line
                self._line = -1
            if c == "\n":
                if self.t_max_s and time.perf_counter() - self.start > self.t_max_s:
                    self.reason = "time"
                    return i + 1
                if self.n_indent:
                    self._line = i + 1
        self._seen = len(text)
        return None

    def held(self, end: int) -> int:
        """How much of ``end`` characters may be emitted: not a line that may still be cut."""
        return end if self._line < 0 else min(end, self._line)


class TextOut:
    """Incremental text with stop strings: never emits text that might turn out to start a stop string. Only
    the new text is matched (``StopMatcher``), so a token costs the same however long the answer is.
    ``lines``: the editor stops (``LineStop``); ``reason`` says which stop ended the text."""

    def __init__(self, backend: Backend, stop: tuple[str, ...], lines: LineStop | None = None):
        self.dec = StreamDecoder(backend)
        self.matchers = [StopMatcher(s) for s in stop]
        self.lines = lines
        self.text = ""
        self.scanned = 0  # text already read by the matchers
        self.emitted = 0
        self.stopped = False
        self.reason = ""  # stop | indent | time

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
        end, cuts = len(self.text), []
        if self.matchers:
            hits = [i for i in (m.feed(self.text, self.scanned) for m in self.matchers) if i >= 0]
            self.scanned = len(self.text)
            if hits:
                cuts.append((min(hits), "stop"))
            elif not final:  # the longest tail that may start a stop string waits for the next text
                end -= max(m.k for m in self.matchers)
        if self.lines is not None:
            at = self.lines.cut(self.text)
            if at is not None:
                cuts.append((at, self.lines.reason))
            elif not final:
                end = self.lines.held(end)
        if cuts:
            at, self.reason = min(cuts)
            self.text = self.text[:at]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(end)

    def _take(self, end: int) -> str:
        chunk = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk


# (backend, first output, sampling, rng, stats, max_tokens) -> the tokens of each step; ``max_tokens`` lets a step
# source draft no further than the request may go
StepSource = Callable[[Backend, ForwardOut, SamplingParams, PositionRng, Stats, int], Iterator[list[int]]]
_BLAS = None


def blas_one_thread():
    """A context that holds numpy's BLAS to one thread (entered around each step, never across a yield:
    the limit is process-wide). Its worker threads, and OpenBLAS's spinning between calls, would take cores
    from llama.cpp (measured on 2 cores: a ReDrafter run at 0.78x of plain with the default BLAS threads,
    0.96x with one)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def stream(backend: Backend, prompt: list[int], cfg: GenerationConfig, stats: Stats,
           steps: StepSource = plain_steps, cancel: Cancel = None, out_tokens: list[int] | None = None,
           want_hidden: bool = False, owns_backend: Callable[[], bool] | None = None) -> Iterator[str]:
    """Generate from ``prompt`` and yield text chunks. ``stats`` is filled in as it goes.

    ``steps`` yields lists of new tokens (one for plain decoding, several per speculative step).
    ``want_hidden``: the steps need the target's hidden state at the last prompt position.
    Afterwards the cache holds ``prompt`` plus the generated tokens (the last one may be missing), unless
    ``owns_backend()`` says the backend now serves another request (then it is left alone).
    """
    t0 = time.perf_counter()
    rng = PositionRng(cfg.sampling.seed)
    out = out_tokens if out_tokens is not None else []
    source = None
    t1 = t0
    try:
        try:
            with blas_one_thread():
                first = prefill(backend, prompt, stats, want_hidden, cancel)
        except PrefillCancelled:
            stats.finish_reason = "cancelled"
            return
        t1 = time.perf_counter()
        stats.ttft_s = t1 - t0
        text = TextOut(backend, cfg.stop, cfg.line_stop())
        eog = frozenset() if cfg.ignore_eos else backend.info.eog
        source = steps(backend, first, cfg.sampling, rng, stats, cfg.max_tokens)
        while not stats.finish_reason:
            if is_cancelled(cancel):
                stats.finish_reason = "cancelled"
                break
            try:
                with blas_one_thread():
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
                    stats.finish_reason = text.reason
                    break
                if len(out) >= cfg.max_tokens:
                    stats.finish_reason = "length"
                    break
        tail = text.finish()
        if tail:
            yield tail
    finally:
        if source is not None:
            source.close()
        t2 = time.perf_counter()
        stats.generated_tokens = len(out)
        stats.decode_s, stats.total_s = t2 - t1, t2 - t0
        if not stats.finish_reason:
            stats.finish_reason = "cancelled"
        if owns_backend is None or owns_backend():
            backend.truncate(common_prefix(backend.cached, prompt + out))
