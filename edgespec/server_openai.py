"""The server's OpenAI shapes: the error object (``APIError``), chat and text completions whole or as
server-sent event chunks (``Reply``), ``usage`` and edgespec's own ``edgespec`` figures."""

from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from edgespec import __version__
from edgespec import tools as toolcalls
from edgespec.generate import PromptTooLongError, Stats
from edgespec.runtime import ClosedError
from edgespec.server_engine import RequestTimeout

if TYPE_CHECKING:
    from edgespec.server_app import Server
    from edgespec.server_engine import Job
    from edgespec.server_prepare import Prepared

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "indent": "stop",
          "time": "length"}
PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "response_format")


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
        return SafeJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def dumps(obj) -> str:
    """JSON text that always encodes as UTF-8: non-ASCII as is, unless a string holds a lone surrogate (a
    model may write ``"\\ud800"`` in a tool call's JSON), which is then escaped."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, separators=(",", ":"))
    return text


class SafeJSONResponse(JSONResponse):
    """A JSON response that cannot fail to encode (``dumps``)."""

    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")


def param_of(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "list[str]", "list[int]", "list[ContentPart]", "function-after"):
            out += ("." if out else "") + str(part)
    return out or None


def value_error(e: ValueError) -> APIError:
    """A ``Request``'s ValueError ("top_p must be ...") as a 400 naming its parameter."""
    word = str(e).split(" ", 1)[0].split(".", 1)[0]
    return APIError(400, str(e), param=word if word in PARAMS else None, code="invalid_value")


def internal_error(e: BaseException) -> APIError:
    """The error object for an exception raised while serving a request. An unexpected one is written to the
    server's log and the client gets a generic message: its text may hold paths or llama.cpp's logs."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ClosedError):
        return APIError(503, str(e), "unavailable_error", code="unavailable")
    if isinstance(e, RequestTimeout):
        return APIError(503, str(e), "unavailable_error", code="request_timeout")
    print("edgespec: a request failed:", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    return APIError(500, "the server failed to answer this request (the server's log has the details)",
                    "server_error", code="internal_error")


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

    def cut(self, job: Job) -> dict | None:
        """The answer to a request the server stopped early, when it is not an error (None: an error)."""
        return None

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
                kind, value = await job.next_event()
                if kind == "start":
                    self.queued_s = value
                    if self.chat:
                        yield sse_line(self._chunk({"role": "assistant", "content": ""}))
                elif kind == "chunk":
                    if not self.chat:
                        yield sse_line(self._chunk(value))
                        continue
                    for d in deltas(stream.push(value)) if stream else [{"content": value}]:
                        yield sse_line(self._chunk(d))
                elif kind == "error":  # an error event and no [DONE]: the answer is not complete
                    yield "event: error\n" + sse_line(internal_error(value).body())
                    return
                elif kind == "done":
                    if stream is not None:
                        for d in deltas(stream.finish()):
                            yield sse_line(self._chunk(d))
                    finish = "tool_calls" if n_calls else FINISH.get(value.stats.finish_reason, "stop")
                    last = self._chunk({} if self.chat else "", finish)
                    last["edgespec"] = self.extra(value, job, self.queued_s)
                    yield sse_line(last)
                    if self.include_usage:
                        u = self._head("chat.completion.chunk" if self.chat else "text_completion")
                        u.update(choices=[], usage=self.usage(value, job))
                        yield sse_line(u)
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client went away (or the stream ended): stop decoding for it
            self.srv.engine.remove(job)  # and if it still waits for the model, its place is free


def sse_line(obj: dict) -> str:
    return "data: " + dumps(obj) + "\n\n"
