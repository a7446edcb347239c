"""The embeddable runtime: ``edgespec.load(...)`` (``edgespec.build``) returns a ``Runtime`` with
``generate``, ``stream`` and ``chat``.

One model has one KV cache, so a request owns the model, not a thread. ``stream``/``chat(stream=True)``
return a ``Generation``: an iterator that takes the model at its first chunk and holds it until it is
exhausted, closed or dropped, whichever thread drives it (Starlette's threadpool moves a stream between
threads). ``close()`` is safe from any thread at any time (a Stop button while another thread reads the
stream): it asks a running step to stop and waits for it, so the model is released only after the step that
uses it has finished. A stream that nobody holds any more is freed by refcounting and frees the model without
blocking. A request from another thread waits its turn in FIFO order (``timeout``: after that
many seconds it gets ``BusyError``). When one thread interleaves two streams (``a = rt.stream(p1);
b = rt.stream(p2); next(a); next(b); next(a)``) the suspended stream is preempted: its KV state is saved
and restored bit for bit when it resumes, so neither ever decodes on the other's cache. Per-request
statistics come back with the request (``Generation.stats``, ``Completion.stats``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edgespec import background
from edgespec.backends.base import Backend, KVState
from edgespec.chat_tokens import RenderError, chat_tokens
from edgespec.controller import calibrate, controller_for
from edgespec.generate import (
    PromptTooLongError,
    Stats,
    is_cancelled,
    plain_steps,
    stream,
)
from edgespec.memory.live import peak_rss_bytes, rss_bytes
from edgespec.models.drafting.auto import AutoDrafter
from edgespec.models.drafting.drafter import Drafter
from edgespec.options import Request, as_request
from edgespec.speculative import speculative_steps
from edgespec.structured import Constraint

if TYPE_CHECKING:
    from edgespec.session import ChatSession


class BusyError(RuntimeError):
    """The model served another request for longer than the request's ``timeout``."""


class ClosedError(RuntimeError):
    """The runtime has been closed."""


class TemplateError(ValueError):
    """The model's chat template could not render the conversation."""


@dataclass
class Completion:
    text: str
    tokens: list[int]
    stats: Stats
    dropped_messages: int = 0  # oldest messages left out so the conversation fits the context


class PromptCache(Protocol):
    """Keeps KV states of earlier prompts (the server's multi-conversation cache)."""

    def before(self, backend: Backend, prompt: list[int]) -> None:
        """Called with the model owned, before prefill: restore the best saved prefix of ``prompt``."""
        ...

    def after(self, backend: Backend) -> None:
        """Called with the model owned, after a request: remember the cache's state."""
        ...


class _Slot:
    """A request's claim on the model, kept by the runtime (guarded by ``Runtime._cond``). It holds no
    reference to its ``Generation``, so a stream that nobody holds any more is freed at once by refcounting,
    and its ``__del__`` frees the model."""

    __slots__ = ("busy", "closed", "stop", "saved")

    def __init__(self):
        self.busy: int | None = None  # the thread running this request's code (a step or its finish)
        self.closed = False  # closed or abandoned: no step starts any more
        self.stop = False  # asks the running step to stop at its next check (read without the lock)
        self.saved: KVState | None = None  # our cache while another request has preempted us


class Generation(Iterator[str]):
    """One request's text stream. ``stats`` and ``tokens`` fill in as it runs."""

    def __init__(self, rt: Runtime, prompt: list[int], req: Request, dropped: int = 0,
                 drafter: Drafter | None = None):
        self.rt = rt
        self.drafter = drafter  # this request's own drafter (e.g. from a predicted output), else the runtime's
        self.prompt = prompt
        self.req = req
        self.stats = Stats()
        self.tokens: list[int] = []
        self.dropped_messages = dropped
        self.truncated = False  # an infill prompt was cut to fit the context
        self._slot = _Slot()
        self._inner: Iterator[str] | None = None
        self._done = False
        self._active = False  # counted in background.ACTIVITY (from the first step to the end)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self._done or not self.rt._enter(self._slot, self.req.timeout):
            raise StopIteration  # finished, or closed (from another thread) while we waited
        try:
            if self._inner is None:
                self._start()
            elif self._slot.saved is not None:
                self.rt.backend.load_state(self._slot.saved)
                self._slot.saved = None
            return next(self._inner)
        except BaseException:
            self._finish()
            raise
        finally:
            self.rt._leave_step(self._slot)

    def _start(self) -> None:
        rt, slot, cancel = self.rt, self._slot, self.req.cancel
        if rt.prompt_cache is not None:
            rt.prompt_cache.before(rt.backend, self.prompt)
        drafter, ctl = rt.drafter, rt.controller
        if self.drafter is not None:  # a per-request drafter gets a controller seeded with the measured costs
            # (asked first, beside the runtime's own sources when those are the combined default)
            drafter = rt.drafter.with_sources([self.drafter]) if isinstance(rt.drafter, AutoDrafter) else self.drafter
            ctl = controller_for(drafter, costs=dict(rt.controller.verify_s), **rt.exact_caps())
            ctl.memory = rt.controller.memory
        steps = plain_steps if drafter is None else speculative_steps(drafter, ctl)
        if self.req._grammar is not None:  # forced tokens in one batch, drafts cut and verified under the grammar
            constraint = Constraint.for_backend(rt.backend, self.req._grammar)
            steps = speculative_steps(drafter, ctl, constraint)
        background.ACTIVITY.enter()  # background work in this process waits until the request ends
        self._active = True
        rt.last_stats = self.stats
        # the closures hold the slot, never ``self``: no reference cycle keeps an abandoned stream alive; the
        # backend is ours only while a thread runs our code (not from a collector finalizing the stream)
        self._inner = stream(rt.backend, self.prompt, self.req._config, self.stats, steps=steps,
                             cancel=lambda: is_cancelled(cancel) or slot.stop, out_tokens=self.tokens,
                             want_hidden=drafter is not None and drafter.needs_hidden,
                             owns_backend=lambda: rt._owner is slot and slot.busy is not None)

    def _finish(self) -> None:
        """Release the model (after the stream ended, failed or was closed), by the thread that runs our code."""
        if self._done:
            return
        rt, slot = self.rt, self._slot
        self._done = slot.closed = True  # a thread that waits to run a step of ours gives up
        try:
            if self._inner is not None and rt._owner is slot:
                self._inner.close()  # runs the stream's own cleanup (stats, cache trimmed to prompt + output)
                if rt.prompt_cache is not None and not rt.closed:
                    rt.prompt_cache.after(rt.backend)
        finally:
            slot.saved = None
            rt._release(slot)
            self._leave()
            if self._inner is not None:
                rt._after_request()

    def _leave(self) -> None:
        if self._active:
            self._active = False
            background.ACTIVITY.leave()

    def close(self) -> None:
        """Stop the request and release the model: safe from any thread, at any time, and more than once. A
        step running in another thread is asked to stop and waited for; the model is released after it. From
        inside its own step (a cancel callback) it only asks the step to stop."""
        if self._done:
            return
        rt, slot, me = self.rt, self._slot, threading.get_ident()
        with rt._cond:
            slot.stop = True
            if slot.busy == me:
                return
            slot.closed = True
            rt._cond.notify_all()  # a thread waiting to run a step of ours gives up
            while slot.busy is not None:
                rt._cond.wait()
            if self._done:  # the step ended the stream itself
                return
            slot.busy = me
            owned = rt._owner is slot and not rt.closed
        try:
            if owned:
                self._finish()
            else:  # never started, or preempted, or the runtime is closed: the backend is not ours
                self._drop()
        finally:
            rt._leave_step(slot)

    def _drop(self) -> None:
        self._done = self._slot.closed = True
        self._slot.saved = None
        if self._inner is not None:
            self._inner.close()  # its cleanup skips the backend, which it does not own
        self.rt._release(self._slot)
        self._leave()

    def __del__(self):
        try:
            if not self._done:
                # no cleanup on the backend here (a collector may run at any time): the next request trims
                # the cache to its own prompt
                self._done = True
                self.rt._abandon(self._slot)
                self._leave()
        except Exception:
            pass

    def text(self) -> str:
        """Drain the stream and return the whole text."""
        return "".join(self)


class Runtime:
    def __init__(self, backend: Backend, model: str, drafter: Drafter | None = None,
                 width: int | None = None, fixed_depth: int | None = None, exact: bool = False,
                 adapter=None, make_adapter=None):
        self.backend = backend
        self.model = model
        self.last_stats: Stats | None = None
        self.drafter = drafter
        self.exact = exact
        # online adaptation of a ReDrafter head: on from the start (``adapter``), or made by ``make_adapter``
        # once the head has shown that it pays on this machine (``adapt="auto"``); run by the background worker
        self.adapter = adapter
        self.make_adapter = make_adapter
        if adapter is not None:
            background.at_exit(self, adapter.close)  # a process that exits without close() keeps what it learned
        self.notices: list[str] = []  # one-line messages from loading (e.g. adaptation switched off)
        self.prompt_cache: PromptCache | None = None
        self.plan = None  # the memory plan, when loaded with a budget
        self.closed = False
        self._cond = threading.Condition(threading.Lock())
        self._owner: _Slot | None = None  # the request whose cache the model holds
        self._owner_thread: int | None = None  # the thread that last ran a step of it
        self._waiting: deque[_Slot] = deque()
        costs = None
        if drafter is not None and fixed_depth is None:
            costs = calibrate(backend)  # seed the cost model (~1 s)
            backend.truncate(0)
        self.controller = controller_for(drafter, width, fixed_depth, costs, **self.exact_caps())

    def _after_request(self) -> None:
        """Between requests: start adapting a head that has shown it pays, and queue a due update."""
        if self.closed:
            return
        if self.adapter is None and self.make_adapter is not None and self.head_pays():
            need = self.make_adapter.bytes
            guard = self.controller.memory
            if guard is None or guard.limit - rss_bytes() >= need:
                self.adapter, self.make_adapter = self.make_adapter(), None
                background.at_exit(self, self.adapter.close)  # a process that exits without close() keeps it
        if self.adapter is not None and self.adapter.pending():
            background.WORKER.submit(self.adapter, self.adapter.update())

    def head_pays(self) -> bool:
        """Has the drafter's learned head shown that it pays here (its measured gain per draft positive)?"""
        if isinstance(self.drafter, AutoDrafter):
            return self.drafter.head_pays()
        return self.drafter is not None and self.drafter.name == "redrafter" and self.controller.best_depth() > 0

    def exact_caps(self) -> dict:
        """``controller_for``'s exactness limits: the backend's, with ``exact``; none without."""
        if not self.exact:
            return {}
        return {"exact_rows": self.backend.exact_rows, "exact_context": self.backend.exact_context}

    # ---- ownership ------------------------------------------------------------------------------
    def _enter(self, slot: _Slot, timeout: float | None) -> bool:
        """Wait until this thread may run a step of ``slot``'s request: no other thread runs its code, and the
        model is ours (free and our turn, or preempted from a stream this thread suspended). False if the
        request is closed meanwhile; ``ClosedError`` if the runtime is."""
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting.append(slot)
            try:
                while True:
                    if self.closed:
                        raise ClosedError("this runtime has been closed")
                    if slot.closed:
                        return False
                    owner = self._owner
                    free = owner is None and self._waiting[0] is slot
                    # the owner waits at a yield, and it is this thread that drives it: waiting would never
                    # end, so it is preempted (its cache saved, restored when it resumes)
                    preempt = (owner is not None and owner is not slot and owner.busy is None
                               and self._owner_thread == me)
                    if slot.busy is None and (owner is slot or free or preempt):
                        if preempt:
                            owner.saved = self.backend.save_state()
                        self._owner, self._owner_thread, slot.busy = slot, me, me
                        return True
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise BusyError(f"the model is serving another request (waited {timeout:.1f} s)")
                    self._cond.wait(left)
            finally:
                self._waiting.remove(slot)
                self._cond.notify_all()

    def _leave_step(self, slot: _Slot) -> None:
        with self._cond:
            slot.busy = None
            self._cond.notify_all()

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            self._free(slot)

    def _free(self, slot: _Slot) -> None:
        """With the lock held: the model is no longer ``slot``'s."""
        if self._owner is slot:
            self._owner = None
        self._cond.notify_all()

    def _abandon(self, slot: _Slot) -> None:
        """A stream that nobody holds frees the model; from ``__del__``, so it never blocks: if the lock is
        taken (maybe by this very thread, further up its stack), a short-lived thread waits for it."""
        slot.closed, slot.saved = True, None
        if self._owner is not slot:  # (it never becomes the owner again once closed)
            return
        if self._cond.acquire(blocking=False):
            try:
                self._free(slot)
            finally:
                self._cond.release()
        else:
            threading.Thread(target=self._release, args=(slot,), name="edgespec-release", daemon=True).start()

    # ---- prompts --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("this runtime has been closed")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, limit: int | None = None) -> list[int]:
        """The prompt tokens of a conversation through the model's chat template. Message contents (system
        prompts and tool results too) are text: a control token inside one stays literal text
        (``chat_tokens``). ``limit``: ``PromptTooLongError`` as soon as the prompt exceeds that many tokens."""
        self._check_open()
        try:
            return chat_tokens(self.backend, messages, tools, limit)
        except RenderError as e:
            raise TemplateError(str(e)) from e

    def fit_chat(self, messages: list[dict], req: Request) -> tuple[list[int], int]:
        """``fit_messages`` with room kept for the answer: its max_tokens, at most a quarter of the context."""
        return self.fit_messages(messages, reserve=min(req.max_tokens, self.backend.n_ctx // 4))

    def fit_messages(self, messages: list[dict], reserve: int) -> tuple[list[int], int]:
        """Context policy: drop the oldest non-system messages until the prompt plus ``reserve`` fits.

        The system message and the latest message are always kept; if those alone do not fit,
        ``PromptTooLongError`` is raised. Returns the prompt tokens and how many messages were dropped.
        """
        check_messages(messages)
        n_ctx = self.backend.n_ctx
        head = [m for m in messages[:1] if m.get("role") == "system"]
        body = messages[len(head):]
        dropped = 0
        while True:
            tokens = self.encode_chat(head + body)
            if len(tokens) + reserve <= n_ctx or len(body) <= 1:
                break
            drop = 2 if len(body) > 2 and body[0].get("role") == "user" else 1  # a user turn with its reply
            body, dropped = body[drop:], dropped + drop
        if len(tokens) >= n_ctx:
            raise PromptTooLongError(f"the last message needs {len(tokens)} tokens but the context holds {n_ctx}")
        return tokens, dropped

    def tokens_of(self, prompt: str | list[int]) -> list[int]:
        self._check_open()
        if isinstance(prompt, str):
            return self.backend.tokenize(prompt, add_special=True, parse_special=False)
        return list(prompt)

    # ---- generation -----------------------------------------------------------------------------
    def start(self, tokens: list[int], req: Request, dropped: int = 0, drafter: Drafter | None = None) -> Generation:
        """A request for ``tokens`` (checked now; it runs when iterated). ``drafter``: this request's own
        drafter instead of the runtime's (under a controller seeded with the runtime's measured costs)."""
        self._check_open()
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.backend.n_ctx:
            raise PromptTooLongError(f"the prompt has {len(tokens)} tokens but the context holds "
                                     f"{self.backend.n_ctx}; shorten it or load with a larger n_ctx")
        return Generation(self, tokens, req, dropped, drafter)

    def stream(self, prompt: str | list[int], request: Request | None = None, **options) -> Generation:
        """Text chunks of a raw completion of ``prompt``; the returned ``Generation`` carries its ``stats``.
        The request's options come as a ``Request`` or as its keywords (``max_tokens=...``), not both."""
        return self.start(self.tokens_of(prompt), as_request(request, options))

    def generate(self, prompt: str | list[int], request: Request | None = None, **options) -> Completion:
        """Complete a raw prompt (no chat template)."""
        gen = self.stream(prompt, request, **options)
        return Completion(gen.text(), gen.tokens, gen.stats)

    def chat(self, messages: list[dict], request: Request | None = None, stream: bool = False,
             **options) -> Completion | Generation:
        """Answer a conversation ([{"role", "content"}, ...]) through the model's chat template.

        The KV cache is reused for the longest common prefix with the previous request, so a growing
        conversation only evaluates its new tokens. With ``stream=True`` returns the ``Generation``.
        """
        req = as_request(request, options)
        tokens, dropped = self.fit_chat(messages, req)
        gen = self.start(tokens, req, dropped)
        if stream:
            return gen
        return Completion(gen.text(), gen.tokens, gen.stats, dropped)

    def infill(self, prefix: str, suffix: str = "", extra=(), request: Request | None = None, stream: bool = False,
               prompt: str = "", filename: str | None = None, repo: str | None = None,
               max_suffix: int | None = None, **options) -> Completion | Generation:
        """Fill in the middle: the code between ``prefix + prompt`` and ``suffix``, with ``extra`` files
        ([{"filename", "text"}, ...]) as repository context, in the model's own FIM format (``infill``). A model
        without FIM tokens raises ``infill.NoFimError`` (a ValueError). The suffix drafts the completion where it
        joins the code after the cursor. Editors set ``n_indent`` and ``t_max_predict_ms``; ``max_suffix``: tokens
        of the suffix in the prompt (default ``infill.SUFFIX_TOKENS``). With ``stream=True`` returns the
        ``Generation``."""
        from edgespec.infill import SUFFIX_TOKENS, fim_prompt, suffix_drafter

        req = as_request(request, options)
        self._check_open()
        fp = fim_prompt(self.backend, prefix, suffix, extra, prompt, filename, repo,
                        reserve=min(req.max_tokens, self.backend.n_ctx // 4),
                        max_suffix=SUFFIX_TOKENS if max_suffix is None else max_suffix)
        gen = self.start(fp.tokens, req, drafter=suffix_drafter(fp) if self.drafter is not None else None)
        gen.truncated = fp.truncated
        if stream:
            return gen
        return Completion(gen.text(), gen.tokens, gen.stats)

    def session(self, system: str | None = None) -> ChatSession:
        from edgespec.session import ChatSession

        return ChatSession(self, system)

    def memory(self):
        self._check_open()
        return self.backend.memory()

    def memory_stats(self) -> dict:
        """Live memory figures: resident set, peak, budget and headroom, KV use, drafter footprint."""
        m = self.memory()
        out = {"rss": rss_bytes(), "peak_rss": peak_rss_bytes(), "kv_used": m.kv_used_bytes,
               "kv_reserved": m.kv_reserved_bytes, "weights": m.weights_bytes, "n_cached": m.n_cached, "n_ctx": m.n_ctx,
               "drafter": self.drafter.footprint()["now"] if self.drafter is not None else 0}
        if self.controller.memory is not None:
            out.update(self.controller.memory.figures())
        return out

    def close(self) -> None:
        """Free the model: a stream in another thread is asked to stop and finishes its step first; a waiting
        request gets ``ClosedError``; adapted drafter state is saved. Later calls raise ``ClosedError``."""
        with self._cond:
            if self.closed:
                return
            while self._owner is not None and self._owner.busy is not None:
                self._owner.stop = True  # a long prefill stops at its next batch
                self._cond.wait()
            self.closed = True
            self._owner = None
            self._cond.notify_all()  # waiters raise ClosedError
        if self.adapter is not None:
            background.WORKER.cancel(self.adapter)  # a running update step finishes; the rest is dropped
            self.adapter.close()  # saves what was adapted
            background.forget(self)
        if self.drafter is not None:
            self.drafter.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_messages(messages) -> None:
    """A conversation is a non-empty list of {"role": str, "content": str} (content may be None for tool calls)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
