"""The server's app: its state (``Server``: the runtime, engine, prompt cache and metrics), the FastAPI app
with its routes and error handlers, and the response of a request (whole or streamed)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgespec import __version__
from edgespec.api_models import ChatRequest, CompletionRequest, InfillRequest, unsupported
from edgespec.prompt_cache import PromptCache, PromptCacheConfig, budget_cap, live_headroom
from edgespec.runtime import ClosedError, Runtime
from edgespec.server_engine import Engine, Job, QueueFull, Ticket
from edgespec.server_guard import Guard, allowed_hosts, key_matches
from edgespec.server_infill import Editors, serve_infill
from edgespec.server_memory import request_bytes, shortfall
from edgespec.server_metrics import CountRequests, Metrics, prometheus
from edgespec.server_openai import APIError, Reply, SafeJSONResponse, internal_error, param_of
from edgespec.server_prepare import DEFAULT_CHAT_MAX_TOKENS, Prepared, prepare, prepare_chat, prepare_completion


def default_max_body(n_ctx: int) -> int:
    """Bytes a request body may have by default: room for a prompt and a prediction of the whole context
    (64 bytes per token of context, JSON escapes included) plus 64 KiB for the rest."""
    return 64 * n_ctx + (64 << 10)


@dataclass
class ServerConfig:
    model_name: str = "edgespec"
    api_key: str | None = None
    max_queue: int = 16  # requests that may wait besides the running one
    cache_entries: int = 8  # conversations kept by the prompt cache (0: off)
    cache_bytes: int = 1 << 30  # its byte cap (under a memory budget: at most what the plan leaves free)
    default_max_tokens: int | None = DEFAULT_CHAT_MAX_TOKENS  # for chat requests that set none (None: the context)
    stream_interval: float = 0.0  # seconds between streamed chunks at most (0: a chunk per token)
    host: str = "127.0.0.1"  # the bind address: on a loopback bind the Host header is checked
    allow_hosts: tuple[str, ...] = ()  # more host names a loopback bind answers for
    cors_origins: tuple[str, ...] = ()  # origins allowed by CORS (none: CORS off)
    max_body: int | None = None  # bytes of a request body (None: ``default_max_body`` of the context)
    request_timeout: float | None = None  # seconds a request may take from its arrival (None: no limit)


class Server:
    """The app's state: the runtime (None while it loads), its request queue, prompt cache and metrics."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.rt: Runtime | None = None
        self.engine: Engine | None = None
        self.cache: PromptCache | None = None
        self.headroom: Callable[[], int] | None = None  # bytes the budget's live guard still allows
        self.metrics = Metrics()
        self.load_error: str | None = None
        self.created = int(time.time())
        self.editors = Editors()  # editor clients: a new /infill request stops the earlier one; its prefix

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
        self.headroom = live_headroom(rt)  # None without a budget
        self.engine = Engine(rt, cfg.max_queue, on_done=self.metrics.record)
        self.rt = rt

    def ready(self) -> Runtime:
        if self.rt is None or self.engine is None:
            msg = "the model failed to load (the server's log says why)" if self.load_error else "the model is loading"
            raise APIError(503, msg, "unavailable_error", code="model_loading" if not self.load_error else None)
        if self.rt.closed:
            raise APIError(503, "the server is shutting down", "unavailable_error")
        return self.rt

    def max_body(self) -> int:
        if self.cfg.max_body is not None:
            return self.cfg.max_body
        return default_max_body(self.rt.backend.n_ctx if self.rt is not None and not self.rt.closed else 16384)

    def admit(self) -> Ticket:
        """A place in the queue for a new request, before it is prepared (429 or 503 if there is none)."""
        engine = self.engine
        try:
            return engine.admit()
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(engine.retry_after())}) from e
        except ClosedError as e:
            raise APIError(503, str(e), "unavailable_error") from e

    async def serve(self, fn, body, http: HttpRequest, chat: bool, reply=None, on_job=None):
        """Admit, prepare (``fn`` in a worker thread) and answer a request. ``reply``: makes the response's shape
        from the prepared request (default: OpenAI's); ``on_job``: see ``respond``."""
        arrived = time.monotonic()
        rt = self.ready()
        bad = unsupported(body)
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
        ticket = self.admit()
        try:
            prep = await prepare(fn, rt, body, *((self.cfg.default_max_tokens,) if chat else ()))
            self.check_memory(prep, int(http.headers.get("content-length") or 0))
        except BaseException:
            ticket.release()
            raise
        return await self.respond(prep, http, body, chat, ticket, arrived, reply and reply(prep), on_job)

    def check_memory(self, prep: Prepared, body_bytes: int) -> None:
        """Under a memory budget: 503 with Retry-After when the live headroom cannot take this request now."""
        need = request_bytes(body_bytes, len(prep.tokens), prep.req.max_tokens,
                             prep.drafter.footprint()["max"] if prep.drafter is not None else 0)
        short = shortfall(self.headroom, need)
        if short:
            self.metrics.memory_refusals += 1
            raise APIError(503, f"the server's memory budget has no room for this request now ({need >> 10} KiB "
                           f"needed, {short >> 10} KiB missing); retry later or send a shorter request",
                           "unavailable_error", code="memory_budget",
                           headers={"Retry-After": str(self.engine.retry_after())})

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

    async def respond(self, prep: Prepared, http: HttpRequest, body, chat: bool, ticket: Ticket, arrived: float,
                      reply=None, on_job=None):
        """Queue the prepared request and answer it: whole, or as server-sent events. ``--request-timeout``
        counts from ``arrived`` (time.monotonic()) and is checked before every decoding step and when the
        request leaves the queue. ``reply``: the response's shape (default: OpenAI's ``Reply``); ``on_job``: called
        with the job before it is queued."""
        engine = self.engine
        job = Job(prep.tokens, prep.req, asyncio.get_running_loop(), prep.drafter, cancel=prep.req.cancel,
                  interval=self.cfg.stream_interval if body.stream else math.inf, ticket=ticket)
        if self.cfg.request_timeout is not None:
            job.deadline = arrived + self.cfg.request_timeout
        prep.req.cancel = job.stopped  # checked before every decoding step
        if on_job is not None:
            on_job(job)
        try:
            engine.submit(job)
        except ClosedError as e:
            ticket.release()
            raise APIError(503, str(e), "unavailable_error") from e
        if reply is None:
            reply = Reply(self, prep, chat, body.stream_options is not None and bool(body.stream_options.include_usage))
        if body.stream:
            return StreamingResponse(reply.sse(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(watch_disconnect(http, job, engine))
        try:
            parts = []
            while True:
                kind, value = await job.next_event()
                if kind == "chunk":
                    parts.append(value)
                elif kind == "start":
                    reply.queued_s = value
                elif kind == "error":
                    answer = reply.cut(job)
                    if answer is not None:
                        return SafeJSONResponse(answer)
                    raise internal_error(value)
                elif kind == "done":
                    return SafeJSONResponse(reply.whole("".join(parts), value, job))
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op once done; stops the request if this handler was cancelled
            engine.remove(job)  # a client that left while it waited gives its place back


async def watch_disconnect(http: HttpRequest, job: Job, engine: Engine) -> None:
    """Stop ``job`` when the client hangs up (the body has been read, so only a disconnect can come): its
    request stops at the next step, or leaves the queue if it still waits."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            engine.remove(job)
            return


# declares the key in the OpenAPI schema (and /docs); the guard checks it, before the body is read
_bearer = HTTPBearer(auto_error=False, description="the server's API key (--api-key or EDGESPEC_API_KEY)")
KEYED = [Depends(_bearer)]


def create_app(srv: Server) -> FastAPI:
    """The app: routes and error handlers behind the guard (``server_guard``), CORS only for
    ``cors_origins``, and every response counted for ``/metrics``."""
    app = FastAPI(title="edgespec", version=__version__, default_response_class=SafeJSONResponse,
                  description="OpenAI-compatible local server with speculative decoding under a memory budget")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        param = param_of(tuple(first.get("loc", ())))
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
        return internal_error(e).response()

    @app.post("/v1/chat/completions", dependencies=KEYED)
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        """Chat completion (OpenAI API): streamed with ``"stream": true``."""
        return await srv.serve(prepare_chat, body, http, chat=True)

    @app.post("/v1/completions", dependencies=KEYED)
    async def completions(body: CompletionRequest, http: HttpRequest):
        """Text completion of a raw prompt (OpenAI's legacy API)."""
        return await srv.serve(prepare_completion, body, http, chat=False)

    @app.post("/infill", dependencies=KEYED)
    async def infill(body: InfillRequest, http: HttpRequest):
        """Fill in the middle at an editor's cursor: llama-server's ``/infill`` (llama.vscode, llama.vim)."""
        return await serve_infill(srv, body, http)

    @app.get("/v1/models", dependencies=KEYED)
    async def models():
        """The loaded model, with its context size."""
        rt = srv.ready()
        return {"object": "list", "data": [{
            "id": srv.cfg.model_name, "object": "model", "created": srv.created, "owned_by": "edgespec",
            "context_length": rt.backend.n_ctx,
            "edgespec": {"backend": rt.backend.name, "architecture": rt.backend.info.arch,
                         "drafter": rt.drafter.name if rt.drafter is not None else None}}]}

    @app.get("/health")
    async def health(http: HttpRequest):
        """200 once the model is loaded, 503 while it loads; the model and a load error only with the key
        (when one is set)."""
        key = srv.cfg.api_key
        details = not key or key_matches(http.headers.get("authorization"), key)
        if srv.rt is None:
            out = {"status": "error" if srv.load_error else "loading"}
            if details and srv.load_error:
                out["error"] = srv.load_error
            return SafeJSONResponse(out, status_code=503)
        return {"status": "ok", "model": srv.cfg.model_name} if details else {"status": "ok"}

    @app.get("/metrics", dependencies=KEYED, response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text format."""
        return PlainTextResponse(prometheus(srv), media_type="text/plain; version=0.0.4")

    cfg = srv.cfg
    app.add_middleware(Guard, hosts=allowed_hosts(cfg.host, cfg.allow_hosts), key=cfg.api_key, max_body=srv.max_body)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(CountRequests, metrics=srv.metrics)
    return app
