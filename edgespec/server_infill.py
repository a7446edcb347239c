"""The server's ``POST /infill``: llama-server's fill-in-the-middle endpoint as editors use it (llama.vscode,
llama.vim): the request's code around the cursor and other files become the model's FIM prompt (``infill``), and
the answer carries the fields they read (``content``, ``timings``, ``tokens_cached``, ``truncated``,
``generation_settings.n_ctx``; ``response_fields`` picks some, as llama-server does).

An editor sends a request at every pause in typing, so a new ``/infill`` request from a client host stops the one
it still has running or waiting (``Editors``), and the model starts on the new cursor at once; the replaced one
answers with no text (``superseded: true``). The window of lines before the cursor that the editor sends slides
down with the cursor; the server keeps its start where the client's previous request had it (``infill.anchored``),
so a new line costs its own tokens and the suffix, not the whole prefix again.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request as HttpRequest

from edgespec.api_models import InfillRequest
from edgespec.infill import NoFimError, anchored, fim_prompt, suffix_drafter
from edgespec.options import Request
from edgespec.runtime import Runtime
from edgespec.server_engine import Job
from edgespec.server_openai import APIError, Reply, internal_error, sse_line, value_error
from edgespec.server_prepare import Prepared, check_chars, check_options, too_long

ANCHOR_CHARS_PER_TOKEN = 8  # an anchored prefix is kept to about twice what the context holds (~4 chars a token)
STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit", "context": "limit", "indent": "limit", "time": "limit"}


class Editors:
    """What the server keeps of each editor client (a host): its latest ``/infill`` request, in order of arrival
    (a newer one cuts the job of an earlier one, ``Job.cut("superseded")``, and takes it out of the queue if it
    still waits there; a job whose request was overtaken while it was prepared is cut as soon as it is made), and
    the prefix it last sent (``anchor``)."""

    def __init__(self):
        self.latest: dict[str, int] = {}  # client -> number of its latest request
        self.jobs: dict[str, Job] = {}  # client -> the job of its latest request, once made
        self.prefixes: dict[str, str] = {}  # client -> the prefix of its latest request, as anchored
        self._seq = 0
        self._lock = threading.Lock()

    def anchor(self, key: str, prefix: str, max_chars: int) -> str:
        """``prefix`` anchored at the start of the client's previous one (``infill.anchored``), kept for the next
        request; at most ``max_chars`` characters (whole lines dropped from the start beyond that)."""
        if not prefix:
            return prefix
        with self._lock:
            out = anchored(self.prefixes.get(key, ""), prefix)
            if len(out) > max(max_chars, len(prefix)):
                cut = out.find("\n", len(out) - max(max_chars, len(prefix))) + 1
                out = out[cut:] if 0 < cut else prefix
            self.prefixes[key] = out
        return out

    def arrive(self, key: str, engine) -> int:
        """A new request of ``key``: stop its earlier job; the request's number."""
        with self._lock:
            self._seq += 1
            self.latest[key] = self._seq
            old = self.jobs.pop(key, None)
        if old is not None:
            stop(old, engine)
        return self._seq

    def claim(self, key: str, seq: int, job: Job, engine) -> None:
        """The job of request ``seq``: kept as ``key``'s latest, or cut at once if a newer request came."""
        with self._lock:
            newest = self.latest.get(key) == seq
            if newest:
                self.jobs[key] = job
        if not newest:
            stop(job, engine)


def stop(job: Job, engine) -> None:
    job.cut("superseded")
    engine.remove(job)


def prepare_infill(rt: Runtime, body: InfillRequest, editors: Editors | None = None, key: str = "") -> Prepared:
    """An ``/infill`` request as FIM prompt tokens, a ``Request`` with its editor stops and a suffix drafter,
    or an ``APIError``. ``n_predict`` 0 only caches the prompt (one token is generated and not returned). With
    ``editors``, the prefix is anchored where client ``key``'s previous one began."""
    check_options(body)
    extra = [{"filename": c.filename, "text": c.text} for c in body.input_extra]
    chars = len(body.input_prefix) + len(body.input_suffix) + len(body.prompt)
    chars += sum(len(c["filename"]) + len(c["text"]) for c in extra)
    check_chars(rt, chars, "input (prefix, suffix, prompt and extra chunks)", "input_prefix")
    n_ctx = rt.backend.n_ctx
    prefix = body.input_prefix
    if editors is not None:
        prefix = editors.anchor(key, prefix, n_ctx * ANCHOR_CHARS_PER_TOKEN)
    n_predict = body.n_predict if body.n_predict is not None else body.max_tokens
    want = Request.max_tokens if n_predict is None or n_predict < 0 else max(1, n_predict)
    try:
        fp = fim_prompt(rt.backend, prefix, body.input_suffix, extra, body.prompt, body.filename,
                        reserve=min(want, n_ctx // 2))
    except NoFimError as e:
        raise APIError(400, str(e), param="input_prefix", code="fim_unsupported") from e
    room = n_ctx - len(fp.tokens)
    if room < 2:
        raise too_long(n_ctx, f"prompt has {len(fp.tokens)} tokens", "input_prefix")
    t_max = body.t_max_predict_ms if body.t_max_predict_ms and body.t_max_predict_ms > 0 else 0.0
    try:
        req = Request(max_tokens=min(want, room - 1), temperature=body.temperature or 0.0,
                      top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                      stop=() if body.stop is None else body.stop, n_indent=body.n_indent, t_max_predict_ms=t_max,
                      cancel=threading.Event())
    except ValueError as e:
        raise value_error(e) from e
    drafter = suffix_drafter(fp) if rt.drafter is not None else None
    return Prepared(fp.tokens, req, drafter, None, "", fp.truncated)


def pick(obj: dict, paths: list[str]) -> dict:
    """llama-server's ``response_fields``: each "a/b" path's value under its own name, where it exists."""
    out = {}
    for path in paths:
        v = obj
        for key in path.split("/"):
            if not isinstance(v, dict) or key not in v:
                break
            v = v[key]
        else:
            out[path] = v
    return out


class InfillReply(Reply):
    """Shapes an ``/infill`` answer as llama-server does: one JSON object, or server-sent events of
    ``{"content", "stop": false}`` pieces ending with the whole object (empty ``content``, ``stop: true``)."""

    def __init__(self, srv, prep: Prepared, body: InfillRequest):
        super().__init__(srv, prep, False, False)
        self.body = body
        self.warm = body.n_predict == 0  # only caching the prompt: no text is returned

    def final(self, text: str, gen, job: Job) -> dict:
        s, req = gen.stats, self.prep.req
        prompt_ms, predicted_ms = s.ttft_s * 1000, s.decode_s * 1000
        n_pred = 0 if self.warm else s.generated_tokens
        timings = {"cache_n": s.prompt_tokens - s.prefill_tokens, "prompt_n": s.prefill_tokens,
                   "prompt_ms": prompt_ms,
                   "prompt_per_token_ms": prompt_ms / s.prefill_tokens if s.prefill_tokens else 0.0,
                   "prompt_per_second": s.prefill_tokens / s.ttft_s if s.ttft_s > 0 else 0.0,
                   "predicted_n": n_pred, "predicted_ms": predicted_ms,
                   "predicted_per_token_ms": predicted_ms / n_pred if n_pred else 0.0,
                   "predicted_per_second": n_pred / s.decode_s if s.decode_s > 0 else 0.0}
        settings = {"n_ctx": self.srv.rt.backend.n_ctx, "n_predict": req.max_tokens, "temperature": req.temperature,
                    "top_k": req.top_k, "top_p": req.top_p, "seed": req.seed, "n_indent": req.n_indent,
                    "t_max_predict_ms": req.t_max_predict_ms, "stop": list(req._config.stop),
                    "model": self.srv.cfg.model_name}
        return {"index": 0, "content": "" if self.warm else text, "id_slot": 0, "stop": True,
                "model": self.srv.cfg.model_name, "tokens_predicted": n_pred, "tokens_evaluated": s.prompt_tokens,
                "generation_settings": settings, "has_new_line": "\n" in text and not self.warm,
                "truncated": self.prep.truncated, "stop_type": STOP_TYPE.get(s.finish_reason, "none"),
                "stopping_word": "", "tokens_cached": s.prompt_tokens + s.generated_tokens, "timings": timings,
                "edgespec": self.extra(gen, job, self.queued_s)}

    def whole(self, text: str, gen, job: Job) -> dict:
        return self.picked(self.final(text, gen, job))

    def picked(self, out: dict) -> dict:
        return pick(out, self.body.response_fields) if self.body.response_fields else out

    def cut(self, job: Job) -> dict | None:
        """A request replaced by a newer one from its client answers at once with no text (an editor shows no
        suggestion, where an error would show a message); other cuts are errors."""
        if job.reason != "superseded":
            return None
        req = self.prep.req
        settings = {"n_ctx": self.srv.rt.backend.n_ctx, "n_predict": req.max_tokens, "model": self.srv.cfg.model_name}
        timings = dict.fromkeys(("cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
                                 "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"), 0)
        return self.picked({"index": 0, "content": "", "id_slot": 0, "stop": True, "model": self.srv.cfg.model_name,
                            "tokens_predicted": 0, "tokens_evaluated": len(self.prep.tokens),
                            "generation_settings": settings, "has_new_line": False, "truncated": self.prep.truncated,
                            "stop_type": "none", "stopping_word": "", "tokens_cached": 0, "timings": timings,
                            "superseded": True})

    async def sse(self, job: Job) -> AsyncIterator[str]:
        try:
            while True:
                kind, value = await job.next_event()
                if kind == "start":
                    self.queued_s = value
                elif kind == "chunk" and not self.warm:
                    yield sse_line({"index": 0, "content": value, "stop": False, "id_slot": 0})
                elif kind == "error":
                    answer = self.cut(job)
                    yield sse_line(answer) if answer is not None else "event: error\n" + sse_line(
                        internal_error(value).body())
                    return
                elif kind == "done":
                    yield sse_line(self.whole("", value, job))
                    return
        finally:
            job.cancel.set()  # the client went away (or the stream ended): stop decoding for it
            self.srv.engine.remove(job)


async def serve_infill(srv, body: InfillRequest, http: HttpRequest):
    """Answer ``POST /infill``: an earlier request of the same client host is stopped first."""
    srv.ready()
    key = http.client.host if http.client is not None else ""
    seq = srv.editors.arrive(key, srv.engine)
    return await srv.serve(partial(prepare_infill, editors=srv.editors, key=key), body, http, chat=False,
                           reply=lambda prep: InfillReply(srv, prep, body),
                           on_job=lambda job: srv.editors.claim(key, seq, job, srv.engine))
