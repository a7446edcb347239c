"""``edgespec serve``: an OpenAI-compatible HTTP server over one ``Runtime``, for desktop apps and SDKs.

FastAPI on uvicorn: pydantic request models give strict validation and the OpenAPI schema (served at
``/openapi.json``, used by the fuzz test). One model serves one request at a time: requests wait in a bounded
FIFO (``Engine``; 429 with ``Retry-After`` beyond ``max_queue``), and a single worker thread drives each
``Generation`` to the end. The HTTP side only moves text: a client that goes away sets its request's cancel
event, which the decoding loop checks before every step, and the worker takes the next request at once.

Endpoints: ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events with
``data: [DONE]``), ``GET /v1/models``, ``/health`` (503 while the model loads) and ``/metrics`` (Prometheus).
Unsupported options are refused by name with an OpenAI-style error object, never ignored; a prompt that does
not fit the context is refused with its token counts, never truncated. A multi-conversation prompt cache
(``prompt_cache.py``) restores the KV state of recent conversations, and ``prediction`` (predicted outputs)
drafts from the text the client expects (``models/prediction.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgespec import __version__
from edgespec import tools as toolcalls
from edgespec.api_models import ChatRequest, CompletionRequest, unsupported
from edgespec.generate import PromptTooLongError, Stats
from edgespec.models.prediction import PredictionDrafter
from edgespec.prompt_cache import PromptCache, PromptCacheConfig, budget_cap, live_headroom
from edgespec.runtime import ClosedError, Request, Runtime, TemplateError

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


# ---- errors ----------------------------------------------------------------------------------------
class APIError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param_of(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "list[str]", "list[int]", "list[ContentPart]", "function-after"):
            out += ("." if out else "") + str(part)
    return out or None


def _value_error(e: ValueError) -> APIError:
    """A ``Request``'s ValueError ("top_p must be ...") as a 400 naming its parameter."""
    word = str(e).split(" ", 1)[0]
    return APIError(400, str(e), param=word if word in PARAMS else None, code="invalid_value")


# ---- the request queue -----------------------------------------------------------------------------
@dataclass
class Job:
    """One request on its way through the queue. The worker reports ``("start", queued_s)``,
    ``("chunk", text)``, ``("done", Generation)`` or ``("error", exc)`` on ``events`` (thread-safe)."""

    tokens: list[int]
    req: Request
    loop: asyncio.AbstractEventLoop
    drafter: PredictionDrafter | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    # text is handed to the event loop at most once per ``interval`` seconds (the first piece at once; inf:
    # only with the end): each hand-over wakes the loop and the client, and on a 2-core machine every wake-up
    # takes a core from the decoding threads
    interval: float = 0.0
    _text: list[str] = field(default_factory=list)
    _scheduled: bool = False
    _last: float = -math.inf
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, kind: str, value=None) -> None:
        if kind == "chunk" and self.interval > 0:
            with self._lock:
                self._text.append(value)
                if self._scheduled or self.interval == math.inf:
                    return
                self._scheduled = True
                delay = self._last + self.interval - time.perf_counter()
            if delay > 0:
                self._call(self.loop.call_later, delay, self._flush)
            else:
                self._call(self._flush)
            return
        text = self._take()  # the end (or an error) comes after all the text before it
        if text:
            self._call(self.events.put_nowait, ("chunk", text))
        self._call(self.events.put_nowait, (kind, value))

    def _take(self) -> str:
        with self._lock:
            text, self._text = "".join(self._text), []
            return text

    def _flush(self) -> None:
        """In the event loop: hand over the text gathered since the last hand-over."""
        with self._lock:
            self._scheduled = False
            self._last = time.perf_counter()
        text = self._take()
        if text:
            self.events.put_nowait(("chunk", text))

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class QueueFull(RuntimeError):
    pass


class Engine:
    """A bounded FIFO of requests served one at a time by one worker thread."""

    def __init__(self, rt: Runtime, max_queue: int, on_done=None):
        self.rt = rt
        self.max_queue = max_queue
        self.on_done = on_done  # called in the worker with (job, generation) after each request
        self.current: Job | None = None
        self.generated = 0  # tokens generated so far, counted at every step (live)
        self.mean_s = 1.0  # running mean of a request's time, for Retry-After
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgespec-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ClosedError("the server is shutting down")
            if self.current is not None and len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (--max-queue {self.max_queue})")
            self._jobs.append(job)
            self._cond.notify_all()

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.mean_s * (len(self._jobs) + 1))))

    def cancel_all(self) -> None:
        """Stop the running request and everything queued (shutdown)."""
        with self._cond:
            self._stopping = True
            for job in list(self._jobs) + ([self.current] if self.current else []):
                job.cancel.set()
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self.cancel_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self.current = self._jobs.popleft()
            try:
                self._serve(job)
            finally:
                with self._cond:
                    self.current = None

    def _serve(self, job: Job) -> None:
        if job.cancel.is_set():  # the client left (or the server stops) while it waited
            job.emit("error", ClosedError("cancelled before it started"))
            return
        t0 = time.perf_counter()
        job.emit("start", t0 - job.submitted)
        counted = 0
        gen = None
        try:
            gen = self.rt.start(job.tokens, job.req, drafter=job.drafter)
            for chunk in gen:
                n = len(gen.tokens)
                self.generated += n - counted
                counted = n
                job.emit("chunk", chunk)
            self.generated += len(gen.tokens) - counted
            if self.on_done is not None:
                self.on_done(job, gen)
            job.emit("done", gen)
        except Exception as e:  # reported to the client; the server goes on
            job.emit("error", e)
        finally:
            if gen is not None:
                gen.close()
            self.mean_s = 0.8 * self.mean_s + 0.2 * (time.perf_counter() - t0)


# ---- metrics -----------------------------------------------------------------------------------------
@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # (endpoint, status) -> count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0
    decode_s: float = 0.0
    verifies: int = 0
    drafted: int = 0
    accepted: int = 0
    prediction_accepted: int = 0
    prediction_rejected: int = 0
    last: dict = field(default_factory=dict)

    def record(self, job: Job, gen) -> None:
        s: Stats = gen.stats
        self.prompt_tokens += s.prompt_tokens
        self.cached_tokens += s.prompt_tokens - s.prefill_tokens
        self.completion_tokens += s.generated_tokens
        self.cancelled += s.finish_reason == "cancelled"
        self.decode_s += s.decode_s
        self.verifies += s.verifies
        self.drafted += s.drafted
        self.accepted += s.accepted
        if job.drafter is not None:
            self.prediction_accepted += job.drafter.accepted_tokens
            self.prediction_rejected += job.drafter.rejected_tokens
        self.last = {"tok_s": s.tok_s, "ttft_s": s.ttft_s, "tokens_per_verify": s.tokens_per_verify,
                     "acceptance": s.accepted / s.drafted if s.drafted else 0.0}


ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/health": "health", "/metrics": "metrics"}


class _CountRequests:
    """ASGI middleware: count responses by endpoint and status (streams untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = ENDPOINTS.get(scope.get("path", ""), "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests[(endpoint, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


# ---- the server ------------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    model_name: str = "edgespec"
    api_key: str | None = None
    max_queue: int = 16
    cache_entries: int = 8  # conversations kept by the prompt cache (0: off)
    cache_bytes: int = 1 << 30  # its byte cap (under a memory budget: at most what the plan leaves free)
    default_max_tokens: int | None = None  # for chat requests that set no limit (None: up to the context)
    stream_interval: float = 0.0  # seconds between streamed chunks at most (0: a chunk per token)


class Server:
    """The app's state: the runtime (None while it loads), its request queue, prompt cache and metrics."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.rt: Runtime | None = None
        self.engine: Engine | None = None
        self.cache: PromptCache | None = None
        self.metrics = Metrics()
        self.load_error: str | None = None
        self.created = int(time.time())

    def attach(self, rt: Runtime) -> None:
        """Serve ``rt`` (loaded): set up its prompt cache and start the queue's worker."""
        cfg = self.cfg
        if cfg.cache_entries > 0 and cfg.cache_bytes > 0:
            cap = cfg.cache_bytes
            planned = budget_cap(rt)
            if planned is not None:
                cap = min(cap, planned)
            self.cache = PromptCache(PromptCacheConfig(max_entries=cfg.cache_entries, max_bytes=cap),
                                     headroom=live_headroom(rt))
            rt.prompt_cache = self.cache
        self.engine = Engine(rt, cfg.max_queue, on_done=self.metrics.record)
        self.rt = rt

    def ready(self) -> Runtime:
        if self.rt is None or self.engine is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, msg, "unavailable_error", code="model_loading" if not self.load_error else None)
        if self.rt.closed:
            raise APIError(503, "the server is shutting down", "unavailable_error")
        return self.rt

    def cancel_all(self) -> None:
        if self.engine is not None:
            self.engine.cancel_all()

    def close(self) -> None:
        """Stop serving and close the runtime (a running request ends at its next step; adapted drafter
        state is saved)."""
        if self.engine is not None:
            self.engine.stop()
        if self.rt is not None:
            self.rt.close()

    # ---- request preparation (in a worker thread: tokenizing may take a while) ---------------------
    def prepare_chat(self, body: ChatRequest) -> Prepared:
        rt = self.ready()
        msgs = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                                       param=f"messages[{i}].content[{j}]", code="unsupported_content")
                content = "".join(p.text for p in content)
            d = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            for k in ("name", "tool_call_id"):
                if getattr(m, k) is not None:
                    d[k] = getattr(m, k)
            msgs.append(d)
        tools, prefix = None, ""
        choice = body.tool_choice
        if body.tools:
            names = {t.function.name for t in body.tools}
            if not isinstance(choice, str | None) and choice.function.name not in names:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                               param="tool_choice")
            if choice != "none":
                tools = [t.model_dump(exclude_none=True) for t in body.tools]
                choice = choice.model_dump() if not isinstance(choice, str | None) else choice
                prefix = toolcalls.forced_prefix(choice, rt.backend.info.chat_template)
        elif choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice requires tools", param="tool_choice")
        try:
            tokens = rt.encode_chat(toolcalls.template_messages(msgs), tools)
        except TemplateError as e:
            raise APIError(400, f"the chat template could not render the messages: {e}", param="messages") from e
        if prefix:
            tokens = tokens + rt.backend.tokenize(prefix, add_special=False, parse_special=True)
        drafter = None
        if body.prediction is not None:
            p = body.prediction.content
            text = p if isinstance(p, str) else "".join(part.text or "" for part in p)
            pred = rt.backend.tokenize(text, add_special=False, parse_special=False) if text else []
            drafter = PredictionDrafter(pred) if pred else None
        limit = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        req = self._request(body, tokens, limit, param, self.cfg.default_max_tokens)
        names = frozenset(t.function.name for t in body.tools) if tools else None
        return Prepared(tokens, req, drafter, names, prefix)

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        rt = self.ready()
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt")
            tokens = rt.tokens_of(p)
        else:
            n_vocab = rt.backend.info.n_vocab
            if not p or any(not 0 <= t < n_vocab for t in p):
                raise APIError(400, f"token ids must be a non-empty list of integers in [0, {n_vocab})",
                               param="prompt")
            tokens = list(p)
        req = self._request(body, tokens, body.max_tokens, "max_tokens", 16)  # 16: OpenAI's default here
        return Prepared(tokens, req, None, None, "")

    def _request(self, body, tokens: list[int], max_tokens: int | None, param: str, default: int | None) -> Request:
        """The generation request, or a 400: a prompt that does not fit with the asked completion length is
        refused with the token counts (a default length is cut to the room left instead)."""
        n_ctx = self.rt.backend.n_ctx
        n = len(tokens)
        if max_tokens is None and n < n_ctx:
            max_tokens = min(default or n_ctx, n_ctx - n)
        if n >= n_ctx or n + max_tokens > n_ctx:
            want = f" plus {max_tokens} for the completion" if max_tokens is not None else ""
            raise APIError(400, f"this model's context holds {n_ctx} tokens, but the prompt has {n}{want}; shorten "
                                f"the prompt{' or lower ' + param if max_tokens else ''}",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        try:
            return Request(max_tokens=max_tokens,
                           temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                           stop=() if body.stop is None else body.stop, cancel=threading.Event())
        except ValueError as e:
            raise _value_error(e) from e

    # ---- responses ---------------------------------------------------------------------------------
    async def respond(self, prep: Prepared, http: HttpRequest, body, chat: bool):
        engine = self.engine
        job = Job(prep.tokens, prep.req, asyncio.get_running_loop(), prep.drafter, cancel=prep.req.cancel,
                  interval=self.cfg.stream_interval if body.stream else math.inf)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(engine.retry_after())}) from e
        except ClosedError as e:
            raise APIError(503, str(e), "unavailable_error") from e
        reply = Reply(self, prep, chat, body.stream_options is not None and bool(body.stream_options.include_usage))
        if body.stream:
            return StreamingResponse(reply.sse(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_watch_disconnect(http, job.cancel))
        try:
            parts = []
            while True:
                kind, value = await job.events.get()
                if kind == "chunk":
                    parts.append(value)
                elif kind == "start":
                    reply.queued_s = value
                elif kind == "error":
                    raise _internal(value)
                elif kind == "done":
                    return JSONResponse(reply.whole("".join(parts), value, job))
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op once done; stops the request if this handler was cancelled


async def _prepare(fn, body) -> Prepared:
    """Tokenize and check a request in a worker thread (long prompts take a while)."""
    try:
        return await run_in_threadpool(fn, body)
    except UnicodeError as e:  # a lone surrogate ("\\ud800") is valid JSON but not text
        raise APIError(400, f"the request holds text that is not valid Unicode: {e}", code="invalid_unicode") from e


async def _watch_disconnect(http: HttpRequest, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client hangs up (the body has been read, so only a disconnect can come)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _internal(e: BaseException) -> APIError:
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ClosedError):
        return APIError(503, "the server is shutting down", "unavailable_error")
    return APIError(500, f"{type(e).__name__}: {e}", "server_error")


@dataclass
class Prepared:
    tokens: list[int]
    req: Request
    drafter: PredictionDrafter | None
    tools: frozenset[str] | None  # the request's tool names: parse tool calls out of the answer
    prefix: str  # text forced at the start of the answer (tool_choice), part of the prompt


class Reply:
    """Shapes one request's output as an OpenAI chat completion or text completion, whole or as chunks."""

    def __init__(self, srv: Server, prep: Prepared, chat: bool, include_usage: bool):
        self.srv, self.prep, self.chat, self.include_usage = srv, prep, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.queued_s = 0.0  # time the request waited for the model

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.srv.cfg.model_name,
                "system_fingerprint": f"edgespec-{__version__}"}

    def usage(self, gen, job: Job) -> dict:
        s: Stats = gen.stats
        d = job.drafter
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                "total_tokens": s.prompt_tokens + s.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": s.prompt_tokens - s.prefill_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0,
                                              "accepted_prediction_tokens": d.accepted_tokens if d else 0,
                                              "rejected_prediction_tokens": d.rejected_tokens if d else 0}}

    def extra(self, gen, job: Job, queued_s: float) -> dict:
        """edgespec's own figures for the request (an extra field that OpenAI clients ignore)."""
        s: Stats = gen.stats
        drafter = job.drafter or self.srv.rt.drafter
        return {"drafter": drafter.name if drafter is not None else None,
                "tokens_per_verify": round(s.tokens_per_verify, 3),
                "acceptance": round(s.accepted / s.drafted, 3) if s.drafted else None,
                "drafted": s.drafted, "accepted": s.accepted, "prefill_tokens": s.prefill_tokens,
                "ttft_ms": round(s.ttft_s * 1000, 1), "tok_s": round(s.tok_s, 2),
                "queued_ms": round(queued_s * 1000, 1), "finish": s.finish_reason}

    def whole(self, text: str, gen, job: Job) -> dict:
        finish = FINISH.get(gen.stats.finish_reason, "stop")
        out = self._head(self.object)
        if self.chat:
            msg: dict = {"role": "assistant", "content": text, "refusal": None}
            if self.prep.tools:
                content, calls = toolcalls.parse(self.prep.prefix + text, self.prep.tools)
                if calls:
                    msg["content"] = content.strip() or None
                    msg["tool_calls"] = calls
                    finish = "tool_calls"
            out["choices"] = [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}]
        else:
            out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        out["usage"] = self.usage(gen, job)
        out["edgespec"] = self.extra(gen, job, self.queued_s)
        return out

    def _chunk(self, delta: dict | str | None, finish: str | None = None) -> dict:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            out["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
        else:
            out["choices"] = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
        if self.include_usage:
            out["usage"] = None
        return out

    async def sse(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, ``[DONE]``."""
        stream = toolcalls.ToolStream(self.prep.tools) if self.prep.tools else None
        if stream is not None and self.prep.prefix:
            stream.push(self.prep.prefix)
        n_calls = 0

        def deltas(events) -> list[dict]:
            nonlocal n_calls
            out = []
            for kind, value in events:
                if kind == "content":
                    out.append({"content": value})
                else:
                    out.append({"tool_calls": [{"index": n_calls, **value}]})
                    n_calls += 1
            return out

        try:
            while True:
                kind, value = await job.events.get()
                if kind == "start":
                    self.queued_s = value
                    if self.chat:
                        yield _sse(self._chunk({"role": "assistant", "content": ""}))
                elif kind == "chunk":
                    if not self.chat:
                        yield _sse(self._chunk(value))
                        continue
                    for d in deltas(stream.push(value)) if stream else [{"content": value}]:
                        yield _sse(self._chunk(d))
                elif kind == "error":
                    yield _sse(_internal(value).body())
                    break
                elif kind == "done":
                    if stream is not None:
                        for d in deltas(stream.finish()):
                            yield _sse(self._chunk(d))
                    finish = "tool_calls" if n_calls else FINISH.get(value.stats.finish_reason, "stop")
                    last = self._chunk({} if self.chat else "", finish)
                    last["edgespec"] = self.extra(value, job, self.queued_s)
                    yield _sse(last)
                    if self.include_usage:
                        u = self._head("chat.completion.chunk" if self.chat else "text_completion")
                        u.update(choices=[], usage=self.usage(value, job))
                        yield _sse(u)
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client went away (or the stream ended): stop decoding for it


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


# ---- the app -----------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="the server's API key (--api-key or EDGESPEC_API_KEY)")


def create_app(srv: Server) -> FastAPI:
    app = FastAPI(title="edgespec", version=__version__,
                  description="OpenAI-compatible local server with speculative decoding under a memory budget")
    async def auth(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        key = srv.cfg.api_key
        if key and (creds is None or not hmac.compare_digest(creds.credentials.encode(), key.encode())):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        param = _param_of(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        where = f"{param}: " if param else ""
        return APIError(400, f"{where}{first.get('msg', 'invalid value')}", param=param,
                        code=str(first.get("type", "invalid_value"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):
        return _internal(e).response()

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        """Chat completion (OpenAI API): streamed with ``"stream": true``."""
        srv.ready()
        bad = unsupported(body)
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
        prep = await _prepare(srv.prepare_chat, body)
        return await srv.respond(prep, http, body, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, http: HttpRequest):
        """Text completion of a raw prompt (OpenAI's legacy API)."""
        srv.ready()
        bad = unsupported(body)
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
        prep = await _prepare(srv.prepare_completion, body)
        return await srv.respond(prep, http, body, chat=False)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        """The loaded model, with its context size."""
        rt = srv.ready()
        return {"object": "list", "data": [{
            "id": srv.cfg.model_name, "object": "model", "created": srv.created, "owned_by": "edgespec",
            "context_length": rt.backend.n_ctx,
            "edgespec": {"backend": getattr(rt.backend, "name", None), "architecture": rt.backend.info.arch,
                         "drafter": rt.drafter.name if rt.drafter is not None else None}}]}

    @app.get("/health")
    async def health():
        """200 once the model is loaded, 503 while it loads."""
        if srv.rt is None:
            status = "error" if srv.load_error else "loading"
            return JSONResponse({"status": status, "error": srv.load_error}, status_code=503)
        return {"status": "ok", "model": srv.cfg.model_name}

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text format."""
        return PlainTextResponse(prometheus(srv), media_type="text/plain; version=0.0.4")

    app.add_middleware(_CountRequests, metrics=srv.metrics)
    return app


def prometheus(srv: Server) -> str:
    m = srv.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples) -> None:
        lines.append(f"# HELP edgespec_{name} {help}")
        lines.append(f"# TYPE edgespec_{name} {kind}")
        for labels, value in (samples if isinstance(samples, list) else [("", samples)]):
            lines.append(f"edgespec_{name}{labels} {value}")

    metric("requests_total", "counter", "HTTP responses by endpoint and status.",
           [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(m.requests.items())] or [("", 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", m.prompt_tokens)
    metric("prompt_cached_tokens_total", "counter", "Prompt tokens not evaluated (KV cache).", m.cached_tokens)
    metric("completion_tokens_total", "counter", "Tokens generated by finished requests.", m.completion_tokens)
    eng = srv.engine
    metric("generated_tokens_total", "counter", "Tokens generated, counted at every decoding step.",
           eng.generated if eng else 0)
    metric("requests_cancelled_total", "counter", "Requests stopped early (client gone, shutdown).", m.cancelled)
    metric("tokens_per_second", "gauge", "Decoding speed of finished requests (tokens / decode time).",
           round(m.completion_tokens / m.decode_s, 3) if m.decode_s else 0)
    metric("last_tokens_per_second", "gauge", "Decoding speed of the last request.", round(m.last.get("tok_s", 0), 3))
    metric("tokens_per_verify", "gauge", "Tokens committed per target forward pass, all requests.",
           round((m.accepted + m.verifies) / m.verifies, 4) if m.verifies else 0)
    metric("draft_acceptance", "gauge", "Accepted / drafted tokens, all requests.",
           round(m.accepted / m.drafted, 4) if m.drafted else 0)
    metric("prediction_tokens_total", "counter", "Predicted-output tokens drafted, by outcome.",
           [('{outcome="accepted"}', m.prediction_accepted), ('{outcome="rejected"}', m.prediction_rejected)])
    metric("queue_length", "gauge", "Requests waiting for the model.", eng.waiting if eng else 0)
    metric("requests_running", "gauge", "Requests being decoded.", int(eng is not None and eng.current is not None))
    rt = srv.rt
    if rt is not None and not rt.closed:
        mem = rt.memory_stats()
        metric("kv_used_bytes", "gauge", "KV cache bytes holding tokens.", mem["kv_used"])
        metric("kv_reserved_bytes", "gauge", "KV cache bytes reserved for the context.", mem["kv_reserved"])
        metric("kv_cached_tokens", "gauge", "Tokens in the live KV cache.", mem["n_cached"])
        metric("rss_bytes", "gauge", "Resident memory of the server process.", mem["rss"])
        metric("peak_rss_bytes", "gauge", "Peak resident memory.", mem["peak_rss"])
        if "budget" in mem:
            metric("memory_budget_bytes", "gauge", "The --memory-budget.", mem["budget"])
            metric("memory_headroom_bytes", "gauge", "Budget left (after its safety margin).", mem["headroom"])
    c = srv.cache
    if c is not None:
        f = c.figures()
        metric("prompt_cache_entries", "gauge", "Conversation states kept.", f["entries"])
        metric("prompt_cache_bytes", "gauge", "Bytes of the kept states.", f["bytes"])
        metric("prompt_cache_max_bytes", "gauge", "The prompt cache's byte cap.", f["max_bytes"])
        metric("prompt_cache_hits_total", "counter", "Requests that restored a kept state.", f["hits"])
        metric("prompt_cache_misses_total", "counter", "Requests that found none better than the live cache.",
               f["misses"])
        metric("prompt_cache_hit_tokens_total", "counter", "Prompt tokens restored from kept states.",
               f["hit_tokens"])
        metric("prompt_cache_evictions_total", "counter", "States evicted (least recently used first).",
               f["evictions"])
    return "\n".join(lines) + "\n"


# ---- running it ------------------------------------------------------------------------------------
def ready_lines(host: str, port: int, srv: Server) -> list[str]:
    h = f"[{host}]" if ":" in host else host
    base = f"http://{h}:{port}"
    rt = srv.rt
    auth = ' -H "Authorization: Bearer $EDGESPEC_API_KEY"' if srv.cfg.api_key else ""
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}]})
    return [f"edgespec: serving {srv.cfg.model_name} (context {rt.backend.n_ctx}, drafter "
            f"{rt.drafter.name if rt.drafter else 'none'}) at {base}/v1  (Ctrl-C stops)",
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"]


def main(a) -> int:
    """``edgespec serve`` (arguments from ``cli.py``): load the model in the background while /health says
    503, print the URL when both are ready, serve until Ctrl-C/SIGTERM, then close the runtime."""
    from dataclasses import asdict

    from edgespec.build import LoadOptions, check, load
    from edgespec.memory.planner import parse_size

    opts = LoadOptions(n_ctx=a.n_ctx, n_threads=a.threads, kv_type=a.kv_type, backend=a.backend, draft=a.draft,
                       draft_depth=a.draft_depth, draft_width=a.draft_width, memory_budget=a.memory_budget,
                       adapt="auto" if a.adapt is None else a.adapt, exact=a.exact, huge_pages=a.huge_pages)
    check(a.model, opts)
    if a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, not {a.max_queue}")
    if not 0 <= a.stream_interval <= 10_000:
        raise ValueError(f"--stream-interval must be between 0 and 10000 ms, not {a.stream_interval}")
    cfg = ServerConfig(model_name=a.model, api_key=a.api_key or os.environ.get("EDGESPEC_API_KEY") or None,
                       max_queue=a.max_queue, cache_entries=a.cache_entries, cache_bytes=parse_size(a.cache_size),
                       default_max_tokens=a.max_tokens, stream_interval=a.stream_interval / 1000)
    srv = Server(cfg)
    userver = _Uvicorn(uvicorn.Config(create_app(srv), host=a.host, port=a.port, log_level=a.log_level,
                                      timeout_graceful_shutdown=5), on_exit=srv.cancel_all)
    failed: list[int] = []

    def load_model() -> None:
        try:
            rt = load(a.model, **asdict(opts))
        except Exception as e:
            srv.load_error = str(e)
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed.append(2)
            userver.should_exit = True
            return
        for line in rt.notices:
            print(f"edgespec: {line}", file=sys.stderr)
        if rt.plan is not None:
            print(rt.plan.describe(), file=sys.stderr)
        srv.attach(rt)
        while not userver.started and not userver.should_exit:
            time.sleep(0.05)
        if userver.started:
            print("\n".join(ready_lines(a.host, a.port, srv)), flush=True)

    loader = threading.Thread(target=load_model, name="edgespec-load", daemon=True)
    loader.start()
    try:
        userver.run()
    finally:
        loader.join()
        srv.close()
    if userver.started:
        print("edgespec: server stopped, runtime closed", file=sys.stderr, flush=True)
    if not userver.started and not failed:
        return 1  # uvicorn could not start (port in use, ...): it said why
    return failed[0] if failed else 0


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, with our requests cancelled as soon as a shutdown signal arrives (otherwise a
    streaming response would hold the graceful shutdown until its generation ends)."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has stopped, which would end the process (SIGTERM) or unwind
        # it (SIGINT) before the runtime is closed: ``main`` closes it and exits normally instead
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
