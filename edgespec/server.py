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
drafts from the text the client expects (``models/drafting/prediction.py``).

Modules: ``server_app`` (state, routes), ``server_prepare`` (request to runtime), ``server_openai`` (reply and
error shapes), ``server_engine`` (queue and worker), ``server_metrics``. This module runs it (``main``) and
re-exports the pieces that callers use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time

import uvicorn

from edgespec.server_app import Server, ServerConfig, create_app
from edgespec.server_engine import Engine, Job
from edgespec.server_guard import is_loopback
from edgespec.server_metrics import prometheus

__all__ = ["Engine", "Job", "Server", "ServerConfig", "create_app", "main", "prometheus"]

def ready_lines(host: str, port: int, srv: Server) -> list[str]:
    h = f"[{host}]" if ":" in host else host
    base = f"http://{h}:{port}"
    rt = srv.rt
    auth = ' -H "Authorization: Bearer $EDGESPEC_API_KEY"' if srv.cfg.api_key else ""
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}]})
    return [f"edgespec: serving {srv.cfg.model_name} (context {rt.backend.n_ctx}, drafter "
            f"{rt.drafter.name if rt.drafter else 'none'}) at {base}/v1  (Ctrl-C stops)",
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"]


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server that other machines can reach without a key."""
    if is_loopback(host) or api_key:
        return None
    return (f"edgespec: warning: listening on {host} without an API key: anyone who can reach this address can use "
            "the model (set --api-key or EDGESPEC_API_KEY)")


def main(a) -> int:
    """``edgespec serve`` (arguments from ``cli.py``): load the model in the background while /health says
    503, print the URL when both are ready, serve until Ctrl-C/SIGTERM, then close the runtime."""
    from edgespec.build import open_runtime
    from edgespec.commands.common import load_options
    from edgespec.memory.footprint import RUNTIME_OVERHEAD, SERVER_OVERHEAD
    from edgespec.memory.planner import parse_size

    checked = dataclasses.replace(load_options(a), overhead=RUNTIME_OVERHEAD + SERVER_OVERHEAD)  # its libraries
    if a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, not {a.max_queue}")
    if not 0 <= a.stream_interval <= 10_000:
        raise ValueError(f"--stream-interval must be between 0 and 10000 ms, not {a.stream_interval}")
    if a.max_tokens is not None and a.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, not {a.max_tokens}")
    if a.request_timeout is not None and not a.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, not {a.request_timeout}")
    max_body = parse_size(a.max_body) if a.max_body is not None else None
    if max_body is not None and max_body < 1024:
        raise ValueError(f"--max-body must be at least 1KB, not {a.max_body}")
    cfg = ServerConfig(model_name=a.model, api_key=a.api_key or os.environ.get("EDGESPEC_API_KEY") or None,
                       max_queue=a.max_queue, cache_entries=a.cache_entries, cache_bytes=parse_size(a.cache_size),
                       default_max_tokens=a.max_tokens, stream_interval=a.stream_interval / 1000, host=a.host,
                       allow_hosts=tuple(a.allow_host), cors_origins=tuple(a.cors_origin), max_body=max_body,
                       request_timeout=a.request_timeout)
    warning = exposure_warning(a.host, cfg.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    srv = Server(cfg)
    userver = _Uvicorn(uvicorn.Config(create_app(srv), host=a.host, port=a.port, log_level=a.log_level,
                                      timeout_graceful_shutdown=5), on_exit=srv.cancel_all)
    failed: list[int] = []

    def load_model() -> None:
        try:
            rt = open_runtime(checked)
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
