"""``edgespec serve``: the OpenAI-compatible local server (``edgespec.server``)."""

from __future__ import annotations

import argparse
import sys

from edgespec.commands import common


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the 'server' extra)")
    common.add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $EDGESPEC_API_KEY; "
                                                   "none: no key)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model; beyond it 429 with Retry-After (default 16)")
    p.add_argument("--cache-entries", type=int, default=8,
                   help="conversations whose KV state the prompt cache keeps (default 8; 0 turns it off)")
    p.add_argument("--stream-interval", type=float, default=0,
                   help="milliseconds between streamed chunks at most: the text of the tokens decoded meanwhile goes "
                        "in one chunk, the first at once (default 0: a chunk per token)")
    p.add_argument("--cache-size", default="1GB",
                   help="byte cap of the prompt cache (default 1GB; under --memory-budget at most what the plan "
                        "leaves free)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="tokens a chat answer may have when a request sets no max_tokens (default 2048, at most what "
                        "the context leaves)")
    p.add_argument("--max-body", default=None,
                   help="largest request body, e.g. 2MB (default: 64 bytes per token of context plus 64 KiB, room for "
                        "a prompt and a prediction of the whole context)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take from its arrival, waiting included; then it ends with an error "
                        "(default: no limit)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="another host name a loopback server answers for (repeatable; localhost, 127.0.0.1 and "
                        "[::1] always are; other Host headers get 403)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="an origin whose web pages may call the server (repeatable; default: none, CORS off)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"edgespec serve needs {' and '.join(missing)}: pip install 'edgespec[server]'", file=sys.stderr)
        return 2
    from edgespec.server import main as serve_main

    return serve_main(a)
