"""The server's app: its state (``Server``: the runtime, engine, prompt cache and metrics), the FastAPI app
with its routes and error handlers, and the response of a request (whole or streamed)."""

from __future__ import annotations

import asyncio
import hmac
import math
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgespec import __version__
from edgespec.api_models import ChatRequest, CompletionRequest, unsupported
from edgespec.prompt_cache import PromptCache, PromptCacheConfig, budget_cap, live_headroom
from edgespec.runtime import ClosedError, Runtime
from edgespec.server_engine import Engine, Job, QueueFull
from edgespec.server_metrics import CountRequests, Metrics, prometheus
from edgespec.server_openai import APIError, Reply, internal_error, param_of
from edgespec.server_prepare import Prepared, prepare, prepare_chat, prepare_completion


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
        watcher = asyncio.create_task(watch_disconnect(http, job.cancel))
        try:
            parts = []
            while True:
                kind, value = await job.events.get()
                if kind == "chunk":
                    parts.append(value)
                elif kind == "start":
                    reply.queued_s = value
                elif kind == "error":
                    raise internal_error(value)
                elif kind == "done":
                    return JSONResponse(reply.whole("".join(parts), value, job))
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op once done; stops the request if this handler was cancelled


async def watch_disconnect(http: HttpRequest, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client hangs up (the body has been read, so only a disconnect can come)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


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

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        """Chat completion (OpenAI API): streamed with ``"stream": true``."""
        srv.ready()
        bad = unsupported(body)
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
        prep = await prepare(prepare_chat, srv.ready(), body, srv.cfg.default_max_tokens)
        return await srv.respond(prep, http, body, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, http: HttpRequest):
        """Text completion of a raw prompt (OpenAI's legacy API)."""
        srv.ready()
        bad = unsupported(body)
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
        prep = await prepare(prepare_completion, srv.ready(), body)
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

    app.add_middleware(CountRequests, metrics=srv.metrics)
    return app
