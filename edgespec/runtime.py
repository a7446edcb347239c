"""The embeddable runtime: ``edgespec.load(...)`` (``edgespec.build``) returns a ``Runtime`` with
``generate``, ``stream`` and ``chat``.

One model has one KV cache, so a request owns the model, not a thread. ``stream``/``chat(stream=True)``
return a ``Generation``: an iterator that takes the model at its first chunk and holds it until it is
exhausted, closed or garbage-collected, whichever thread drives it (Starlette's threadpool moves a stream
between threads). A request from another thread waits its turn in FIFO order (``timeout``: after that
many seconds it gets ``BusyError``). When one thread interleaves two streams (``a = rt.stream(p1);
b = rt.stream(p2); next(a); next(b); next(a)``) the suspended stream is preempted: its KV state is saved
and restored bit for bit when it resumes, so neither ever decodes on the other's cache. Per-request
statistics come back with the request (``Generation.stats``, ``Completion.stats``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edgespec import background
from edgespec.backends.base import Backend, KVState
from edgespec.chat_tokens import RenderError, chat_tokens
from edgespec.controller import calibrate, controller_for
from edgespec.generate import Cancel, GenerationConfig, PromptTooLongError, Stats, plain_steps, stream
from edgespec.memory.live import peak_rss_bytes, rss_bytes
from edgespec.models.auto import AutoDrafter
from edgespec.models.drafter import Drafter
from edgespec.sampling import SamplingParams
from edgespec.speculative import speculative_steps

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


@dataclass
class Request:
    """Per-request generation options, as accepted by ``generate``/``stream``/``chat``; checked when made."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str = ()
    ignore_eos: bool = False
    cancel: Cancel = None
    timeout: float | None = None  # seconds to wait for the model before BusyError (None: wait)

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{name} must be a number, not {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, not {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if self.timeout is not None and not self.timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, not {self.timeout!r}")
        self._config = self.config()  # raises ValueError naming a bad max_tokens/temperature/top_p/top_k/stop

    def config(self) -> GenerationConfig:
        sp = SamplingParams(float(self.temperature), self.top_k, float(self.top_p), self.seed)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return GenerationConfig(self.max_tokens, sp, stop, self.ignore_eos)


class PromptCache(Protocol):
    """Keeps KV states of earlier prompts (the server's multi-conversation cache)."""

    def before(self, backend: Backend, prompt: list[int]) -> None:
        """Called with the model owned, before prefill: restore the best saved prefix of ``prompt``."""
        ...

    def after(self, backend: Backend) -> None:
        """Called with the model owned, after a request: remember the cache's state."""
        ...


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
        self._inner: Iterator[str] | None = None
        self._saved: KVState | None = None  # our cache while another request has preempted us
        self._done = False
        self._active = False  # counted in background.ACTIVITY (from the first step to the end)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        self.rt._acquire(self, self.req.timeout)
        try:
            if self._inner is None:
                self._start()
            elif self._saved is not None:
                self.rt.backend.load_state(self._saved)
                self._saved = None
            return next(self._inner)
        except BaseException:
            self._finish()
            raise
        finally:
            self.rt._pause(self)

    def _start(self) -> None:
        rt = self.rt
        if rt.prompt_cache is not None:
            rt.prompt_cache.before(rt.backend, self.prompt)
        drafter, ctl = rt.drafter, rt.controller
        if self.drafter is not None:  # a per-request drafter gets a controller seeded with the measured costs
            # (asked first, beside the runtime's own sources when those are the combined default)
            drafter = rt.drafter.with_sources([self.drafter]) if isinstance(rt.drafter, AutoDrafter) else self.drafter
            ctl = controller_for(drafter, costs=dict(rt.controller.verify_s), **rt.exact_caps())
            ctl.memory = rt.controller.memory
        steps = plain_steps if drafter is None else speculative_steps(drafter, ctl)
        background.ACTIVITY.enter()  # background work in this process waits until the request ends
        self._active = True
        rt.last_stats = self.stats
        self._inner = stream(rt.backend, self.prompt, self.req._config, self.stats, steps=steps,
                             cancel=self.req.cancel, out_tokens=self.tokens,
                             want_hidden=drafter is not None and drafter.needs_hidden,
                             owns_backend=lambda: rt._owner is self)

    def _suspend(self) -> None:
        """Another request takes the model while we wait at a yield: keep our cache aside."""
        self._saved = self.rt.backend.save_state()

    def _finish(self) -> None:
        """Release the model (after the stream ended, failed or was closed)."""
        if self._done:
            return
        self._done = True
        rt = self.rt
        try:
            if self._inner is not None and rt._owner is self:
                self._inner.close()  # runs the stream's own cleanup (stats, cache trimmed to prompt + output)
                if rt.prompt_cache is not None and not rt.closed:
                    rt.prompt_cache.after(rt.backend)
        finally:
            self._saved = None
            rt._release(self)
            self._leave()
            if self._inner is not None:
                rt._after_request()

    def _leave(self) -> None:
        if self._active:
            self._active = False
            background.ACTIVITY.leave()

    def close(self) -> None:
        """Stop the request and release the model (safe from any thread, and more than once)."""
        if self._done:
            return
        if self._inner is None or self.rt._owner is not self:  # never started, or preempted: the backend is
            self._drop()  # not ours, so nothing on it is touched
            return
        try:
            self.rt._acquire(self, None, closing=True)
        except ClosedError:
            self._drop()
            return
        self._finish()

    def _drop(self) -> None:
        self._done, self._saved = True, None
        if self._inner is not None:
            self._inner.close()  # its cleanup skips the backend, which it no longer owns
        self.rt._release(self)
        self._leave()

    def __del__(self):
        try:
            if not self._done:
                # no cleanup on the backend here (a collector may run at any time): the next request trims
                # the cache to its own prompt
                self._done = True
                self.rt._release(self)
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
        self._owner_ref: weakref.ref[Generation] | None = None  # weak: an abandoned stream frees the model
        self._in_step = False
        self._owner_thread: int | None = None
        self._waiting: deque[Generation] = deque()
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
    @property
    def _owner(self) -> Generation | None:
        ref = self._owner_ref
        return ref() if ref is not None else None

    def _set_owner(self, gen: Generation | None, thread: int | None = None) -> None:
        self._owner_ref = weakref.ref(gen) if gen is not None else None
        self._in_step, self._owner_thread = gen is not None, thread

    def _acquire(self, gen: Generation, timeout: float | None, closing: bool = False) -> None:
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self.closed and not closing:
                raise ClosedError("this runtime has been closed")
            if self._owner is gen:
                self._set_owner(gen, me)
                return
            self._waiting.append(gen)
            try:
                while True:
                    if self.closed and closing:
                        raise ClosedError("this runtime has been closed")
                    owner = self._owner
                    free = owner is None and self._waiting[0] is gen
                    # the owner waits at a yield, and it is this thread that drives it: waiting would never
                    # end, so it is preempted (its cache saved, restored when it resumes)
                    preempt = owner is not None and not self._in_step and self._owner_thread == me
                    if free or preempt:
                        if preempt:
                            owner._suspend()
                        self._set_owner(gen, me)
                        return
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise BusyError(f"the model is serving another request (waited {timeout:.1f} s)")
                    self._cond.wait(left)
            finally:
                self._waiting.remove(gen)
                self._cond.notify_all()

    def _pause(self, gen: Generation) -> None:
        with self._cond:
            if self._owner is gen:
                self._in_step = False
                self._cond.notify_all()

    def _release(self, gen: Generation) -> None:
        with self._cond:
            if self._owner in (gen, None):
                self._set_owner(None)
            self._cond.notify_all()

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

    def stream(self, prompt: str | list[int], **kwargs) -> Generation:
        """Text chunks of a raw completion of ``prompt``; the returned ``Generation`` carries its ``stats``."""
        req = Request(**kwargs)
        return self.start(self.tokens_of(prompt), req)

    def generate(self, prompt: str | list[int], **kwargs) -> Completion:
        """Complete a raw prompt (no chat template)."""
        gen = self.stream(prompt, **kwargs)
        return Completion(gen.text(), gen.tokens, gen.stats)

    def chat(self, messages: list[dict], stream: bool = False, **kwargs) -> Completion | Generation:
        """Answer a conversation ([{"role", "content"}, ...]) through the model's chat template.

        The KV cache is reused for the longest common prefix with the previous request, so a growing
        conversation only evaluates its new tokens. With ``stream=True`` returns the ``Generation``.
        """
        req = Request(**kwargs)
        tokens, dropped = self.fit_messages(messages, reserve=min(req.max_tokens, self.backend.n_ctx // 4))
        gen = self.start(tokens, req, dropped)
        if stream:
            return gen
        return Completion(gen.text(), gen.tokens, gen.stats, dropped)

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
        """Free the model: a stream in another thread finishes its step first; a waiting stream is dropped;
        adapted drafter state is saved. Later calls raise ``ClosedError``."""
        with self._cond:
            if self.closed:
                return
            while self._owner is not None and self._in_step:
                self._cond.wait()
            self.closed = True
            self._set_owner(None)
            self._cond.notify_all()
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


def load(model: str | None = None, **options) -> Runtime:
    """``edgespec.build.load`` (kept here for ``from edgespec.runtime import load``)."""
    from edgespec import registry
    from edgespec.build import load as _load

    return _load(model or registry.DEFAULT_MODEL, **options)
