"""Benchmark of ``edgespec serve``. The server runs as a real subprocess on a loopback port and
is driven over HTTP (streamed, so times are the client's); the in-process side is ``edgespec.load`` in this
process with the same options. Sections (``--sections``, all by default):

* ``overhead``: the same chat prompts through the server and in-process, interleaved (the order alternates):
  decode tok/s ratio (server / in-process, tokens after the first over the time after the first chunk) and the
  time to first token the server adds (median over prompts); greedy texts compared.
* ``cache``: 4 conversations of ~1,500 tokens (a source file from an installed package and a question), switched
  round-robin for several turns, on a server with the prompt cache and on one without (``--cache-entries 0``):
  time to first token per turn, against a fresh ~50-token prompt's; greedy texts compared.
* ``prediction``: >= 10 edits of real functions from installed packages (rename, add a docstring, change a
  signature), each with and without ``prediction`` (the original code), interleaved: tok/s ratio, accepted
  prediction tokens, greedy texts compared.
* ``rss``: the server's resident memory (from /metrics) after ``--rss-early`` and after ``--requests`` mixed
  requests (short chats, streamed or not, conversation switches, predictions, a hang-up now and then).

Real run (about 40 minutes on 2 cores with the 1.5B model; the machine otherwise idle):

    edgespec bench --server --model qwen2.5-coder-1.5b --threads 2 --out bench_out/server

(``python -m edgespec.benches.server`` takes the same options; ``--help`` lists them). It needs FastAPI, uvicorn
and httpx (the ``dev`` extra; ``server`` has the first two).

It writes ``<out>/server_bench.json``. ``--exact`` keeps verify batches bit-identical to plain decoding (greedy
texts then match for certain; deeper drafts without it). A tiny end-to-end check:

    edgespec bench --server --model smollm2-135m --n-prompts 2 --max-tokens 16 \\
        --conversations 2 --conv-tokens 300 --turns 2 --edits 2 --requests 12 --rss-early 4 --out /tmp/sb
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

import edgespec
from edgespec import machine
from edgespec.benches.prompts import CHAT_PROMPTS
from edgespec.benches.speed import NEAR_TIE, top2_margin

SOURCES = ["textwrap", "shlex", "json.decoder", "json.encoder", "jinja2.utils", "jinja2.filters", "httpx._urlparse",
           "starlette.datastructures", "tqdm.utils", "argparse", "configparser", "difflib"]
FOLLOW_UPS = ["Name one function defined above and say in one sentence what it returns.",
              "Is there anything in this code that could raise an exception? Answer in one sentence.",
              "Suggest one small improvement, in one sentence.",
              "Which standard library modules does it import? Answer briefly."]


@dataclass
class Timed:
    """One answer as the client saw it."""

    text: str
    ttft_s: float  # request sent -> first text
    last_s: float  # request sent -> last text
    tokens: int
    usage: dict | None = None
    extra: dict | None = None

    @property
    def tok_s(self) -> float:
        span = self.last_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


@dataclass
class Options:
    model: str
    threads: int
    n_ctx: int
    draft: str
    exact: bool
    adapt: str

    def serve_args(self) -> list[str]:
        out = ["--model", self.model, "--threads", str(self.threads), "--n-ctx", str(self.n_ctx), "--draft", self.draft]
        out += ["--exact"] if self.exact else []
        out += {"on": ["--adapt"], "off": ["--no-adapt"], "auto": []}[self.adapt]
        return out

    def load(self):
        adapt = {"on": True, "off": False, "auto": "auto"}[self.adapt]
        return edgespec.load(self.model, n_ctx=self.n_ctx, n_threads=self.threads, draft=self.draft, exact=self.exact,
                             adapt=adapt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """``edgespec serve`` in a subprocess, up once /health says so."""

    def __init__(self, opts: Options, extra: list[str], log: Path):
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "edgespec", "serve", *opts.serve_args(), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(1800, connect=10))
        deadline = time.time() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("the server did not come up in 15 minutes")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def chat(self, messages: list[dict], max_tokens: int, **extra) -> Timed:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **extra}
        t0 = time.perf_counter()
        first = last = None
        parts: list[str] = []
        usage = info = None
        for obj in self.events("/v1/chat/completions", body):
            usage = obj.get("usage") or usage
            info = obj.get("edgespec") or info
            for ch in obj.get("choices", []):
                text = ch["delta"].get("content")
                if text:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(text)
        first, last = first or time.perf_counter(), last or time.perf_counter()
        return Timed("".join(parts), first - t0, last - t0, usage["completion_tokens"], usage, info)

    def events(self, path: str, body: dict):
        """The JSON objects of a streamed answer's server-sent events (until ``[DONE]``); an HTTP error or an
        error object raises ``RuntimeError``."""
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:500]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                yield obj

    def hang_up(self, messages: list[dict], after_chunks: int = 3) -> None:
        body = {"messages": messages, "max_tokens": 200, "temperature": 0, "stream": True}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 2 * after_chunks:
                    break

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.http.close()
        return self.proc.returncode


def local_chat(rt, messages: list[dict], max_tokens: int) -> Timed:
    t0 = time.perf_counter()
    gen = rt.chat(messages, stream=True, max_tokens=max_tokens, temperature=0)
    first = last = None
    parts = []
    for chunk in gen:
        last = time.perf_counter()
        first = first or last
        parts.append(chunk)
    first, last = first or time.perf_counter(), last or time.perf_counter()
    return Timed("".join(parts), first - t0, last - t0, gen.stats.generated_tokens, extra=gen.stats.as_dict())


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


# ---- sections ----------------------------------------------------------------------------------------
def bench_overhead(a, rt, srv: ServerProc) -> dict:
    prompts = [[{"role": "user", "content": p}] for p in (CHAT_PROMPTS * 4)[:a.n_prompts]]
    srv.chat([{"role": "user", "content": "Hello"}], 4)  # warm up both sides
    local_chat(rt, [{"role": "user", "content": "Hello"}], 4)
    rows = []
    for i, msgs in enumerate(prompts):
        if i % 2 == 0:
            loc, rem = local_chat(rt, msgs, a.max_tokens), srv.chat(msgs, a.max_tokens)
        else:
            rem, loc = srv.chat(msgs, a.max_tokens), local_chat(rt, msgs, a.max_tokens)
        rows.append({"prompt": i, "tokens": [loc.tokens, rem.tokens],
                     "tok_s": [round(loc.tok_s, 3), round(rem.tok_s, 3)],
                     "ttft_ms": [round(loc.ttft_s * 1000, 1), round(rem.ttft_s * 1000, 1)],
                     "same_text": loc.text == rem.text})
        print(f"  overhead {i + 1}/{len(prompts)}: in-process {loc.tok_s:.2f} tok/s, server {rem.tok_s:.2f} tok/s, "
              f"TTFT {loc.ttft_s * 1000:.0f} / {rem.ttft_s * 1000:.0f} ms", flush=True)
    ratios = [r["tok_s"][1] / r["tok_s"][0] for r in rows if r["tok_s"][0] > 0]
    return {"rows": rows, "tok_s_ratio_median": med(ratios),
            "tok_s_ratio_overall": round(sum(r["tok_s"][1] for r in rows) / sum(r["tok_s"][0] for r in rows), 4)
            if rows and sum(r["tok_s"][0] for r in rows) else None,
            "added_ttft_ms_median": med([r["ttft_ms"][1] - r["ttft_ms"][0] for r in rows]),
            "same_text": sum(r["same_text"] for r in rows), "n": len(rows),
            "note": "tok/s: tokens after the first / time after the first text, as the client sees it"}


def source_text(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text()


def installed_sources():
    """``(module, source text)`` of each of ``SOURCES`` that is installed as a ``.py`` file."""
    for module in SOURCES:
        text = source_text(module)
        if text is not None:
            yield module, text


def conversations(a, rt) -> list[list[dict]]:
    """Opening messages of ``a.conversations`` chats, each about ``a.conv_tokens`` tokens: a source file cut to
    size and a question about it."""
    out = []
    for module, text in installed_sources():
        lines = text.splitlines()
        code, n = [], 0
        for line in lines:
            code.append(line)
            n += len(rt.backend.tokenize(line + "\n", add_special=False, parse_special=False))
            if n >= a.conv_tokens - 60:
                break
        msgs = [{"role": "system", "content": f"You review Python code from the module {module}. Answer briefly."},
                {"role": "user", "content": "Here is the code:\n```python\n" + "\n".join(code) + "\n```\n"
                                            "What is this module for? One sentence."}]
        out.append(msgs)
        if len(out) == a.conversations:
            break
    return out


FRESH = [("Quiz", "the sky"), ("Puzzle", "fresh grass"), ("Riddle", "a ripe lemon"), ("Trivia", "fresh snow"),
         ("Teaser", "the sea"), ("Query", "a ripe tomato"), ("Problem", "a crow"), ("Exercise", "a ripe banana")]


def run_conversations(srv: ServerProc, convs: list[list[dict]], a) -> dict:
    history = [list(c) for c in convs]
    turns = []
    fresh = []

    def turn(k: int, question: str | None) -> None:
        if question is not None:
            history[k].append({"role": "user", "content": question})
        t = srv.chat(history[k], a.turn_tokens)
        history[k].append({"role": "assistant", "content": t.text})
        turns.append({"conversation": k, "turn": sum(m["role"] == "user" for m in history[k]),
                      "ttft_ms": round(t.ttft_s * 1000, 1), "prompt_tokens": t.usage["prompt_tokens"],
                      "cached_tokens": t.usage["prompt_tokens_details"]["cached_tokens"], "text": t.text})
        print(f"  conversation {k} turn {turns[-1]['turn']}: TTFT {t.ttft_s * 1000:.0f} ms, prompt "
              f"{t.usage['prompt_tokens']} ({turns[-1]['cached_tokens']} cached)", flush=True)

    for k in range(len(convs)):
        turn(k, None)
    for r in range(1, a.turns):
        for k in range(len(convs)):
            turn(k, FOLLOW_UPS[(r - 1) % len(FOLLOW_UPS)])
        # a fresh ~50-token prompt, its own words from the first one on, so that it shares only the template's
        # opening with anything cached (its cached tokens are recorded); one a round keeps the cache's entries
        # for the conversations (4 + the fresh ones stay within the default 8)
        subject, thing = FRESH[(r - 1) % len(FRESH)]
        q = (f"{subject} {r}: in one word, what colour is {thing} on a clear summer day at noon? "
             "Reply with just the colour.")
        t = srv.chat([{"role": "user", "content": q}], 4)
        fresh.append({"ttft_ms": round(t.ttft_s * 1000, 1), "prompt_tokens": t.usage["prompt_tokens"],
                      "cached_tokens": t.usage["prompt_tokens_details"]["cached_tokens"]})
    switched = [t["ttft_ms"] for t in turns if t["turn"] > 1]
    return {"turns": turns, "fresh_50": fresh, "switched_ttft_ms_median": med(switched),
            "fresh_50_ttft_ms_median": med([f["ttft_ms"] for f in fresh])}


def bench_cache(a, rt, opts: Options, out: Path) -> dict:
    convs = conversations(a, rt)
    res = {"conversations": len(convs), "opening_tokens": [len(rt.encode_chat(c)) for c in convs]}
    for name, extra in (("with_cache", []), ("without_cache", ["--cache-entries", "0"])):
        print(f"cache: server {name}", flush=True)
        srv = ServerProc(opts, extra, out / f"serve_{name}.log")
        try:
            res[name] = run_conversations(srv, convs, a)
        finally:
            srv.stop()
    w, wo = res["with_cache"], res["without_cache"]
    res["same_text"] = [x["text"] == y["text"] for x, y in zip(w["turns"], wo["turns"], strict=True)]
    res["same_text_note"] = (
        "without the cache, earlier answers are evaluated again in a prefill batch, whose logits differ in the last "
        "bits from the one-token decodes that produced them, so a greedy answer can differ at a near-tie; with the "
        "cache, a conversation continues exactly as an in-process session does (tests/test_server.py)")
    if w["switched_ttft_ms_median"] and w["fresh_50_ttft_ms_median"]:
        res["switched_vs_fresh_50"] = round(w["switched_ttft_ms_median"] / w["fresh_50_ttft_ms_median"], 3)
    if w["switched_ttft_ms_median"] and wo["switched_ttft_ms_median"]:
        res["speedup_of_switch_ttft"] = round(wo["switched_ttft_ms_median"] / w["switched_ttft_ms_median"], 2)
    return res


@dataclass
class Edit:
    module: str
    function: str
    kind: str
    instruction: str
    code: str = field(repr=False)


def edit_set(n: int) -> list[Edit]:
    """``n`` edits of top-level functions (12-40 lines) of installed modules, kinds in rotation."""
    pools = []
    for module, text in installed_sources():
        lines = text.splitlines()
        funcs = []
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and 12 <= node.end_lineno - node.lineno + 1 <= 40:
                start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                funcs.append((node, "\n".join(lines[start:node.end_lineno]) + "\n"))
        if funcs:
            pools.append((module, funcs))
    edits: list[Edit] = []
    kinds = ("rename", "docstring", "signature")
    i = 0
    while len(edits) < n and any(pools):
        module, funcs = pools[i % len(pools)]
        if funcs:
            node, code = funcs.pop(0)
            kind = kinds[len(edits) % 3]
            name = node.name
            if kind == "docstring" and ast.get_docstring(node):
                kind = "signature"
            instruction = {
                "rename": f"Rename the function `{name}` to `{name}_v2` (only its name changes).",
                "docstring": f"Add a one-line docstring to the function `{name}` saying what it does.",
                "signature": f"Add a keyword-only parameter `strict: bool = False` at the end of the signature of "
                             f"`{name}` (the body does not use it).",
            }[kind]
            edits.append(Edit(module, name, kind, instruction, code))
        i += 1
        if i > 10 * len(SOURCES) * max(n, 1):
            break
    return edits


def parting_margin(rt, msgs: list[dict], plain: str, other: str) -> float:
    """Plain decoding's top-two logit margin at the token where ``other`` parts from ``plain`` (the plain text
    re-tokenized; the logits from a prefill of the prompt and the plain tokens before it): a near-tie when it is
    below the speed bench's ``NEAR_TIE``."""
    b = rt.backend
    toks = b.tokenize(plain, add_special=False, parse_special=False)
    n = next((i for i, (x, y) in enumerate(zip(plain, other, strict=False)) if x != y), min(len(plain), len(other)))
    j, text = 0, b""
    while j < len(toks) and len(text.decode("utf-8", errors="replace")) + len(b.token_bytes(toks[j])) <= n:
        text += b.token_bytes(toks[j])
        j += 1
    return top2_margin(b, rt.encode_chat(msgs) + toks[:j])


def bench_prediction(a, rt, srv: ServerProc) -> dict:
    rows = []
    edits = edit_set(a.edits)
    for i, e in enumerate(edits):
        msgs = [{"role": "user", "content": e.instruction + " Reply with the complete updated function in one "
                 "```python code block and nothing else.\n\n```python\n" + e.code + "```"}]
        n_code = len(rt.backend.tokenize(e.code, add_special=False, parse_special=False))
        limit = n_code + a.edit_extra_tokens
        pred = {"prediction": {"type": "content", "content": "```python\n" + e.code + "```"}}
        if i % 2 == 0:
            plain, fast = srv.chat(msgs, limit), srv.chat(msgs, limit, **pred)
        else:
            fast, plain = srv.chat(msgs, limit, **pred), srv.chat(msgs, limit)
        d = fast.usage["completion_tokens_details"]
        rows.append({"module": e.module, "function": e.function, "kind": e.kind, "tokens": [plain.tokens, fast.tokens],
                     "tok_s": [round(plain.tok_s, 3), round(fast.tok_s, 3)],
                     "total_s": [round(plain.last_s, 3), round(fast.last_s, 3)],
                     "accepted_prediction_tokens": d["accepted_prediction_tokens"],
                     "rejected_prediction_tokens": d["rejected_prediction_tokens"],
                     "tokens_per_verify": (fast.extra or {}).get("tokens_per_verify"),
                     "same_text": plain.text == fast.text})
        if plain.text != fast.text:
            rows[-1]["parting_margin"] = round(parting_margin(rt, msgs, plain.text, fast.text), 3)
            rows[-1]["near_tie"] = rows[-1]["parting_margin"] < NEAR_TIE
        print(f"  edit {i + 1}/{len(edits)} {e.kind} {e.module}.{e.function}: {plain.tok_s:.2f} -> {fast.tok_s:.2f} "
              f"tok/s, accepted {d['accepted_prediction_tokens']}/{fast.tokens}, same text {plain.text == fast.text}",
              flush=True)
    tok = [sum(r["tokens"][k] for r in rows) for k in (0, 1)]
    gen_s = [sum(r["tokens"][k] / r["tok_s"][k] for r in rows if r["tok_s"][k] > 0) for k in (0, 1)]
    return {"rows": rows, "n": len(rows), "same_text": sum(r["same_text"] for r in rows),
            "near_ties": sum(r.get("near_tie", False) for r in rows),
            "mismatches": sum(not r["same_text"] and not r.get("near_tie", False) for r in rows),
            "tok_s_ratio_median": med([r["tok_s"][1] / r["tok_s"][0] for r in rows if r["tok_s"][0] > 0]),
            "tok_s_ratio_overall": round((tok[1] / gen_s[1]) / (tok[0] / gen_s[0]), 4) if all(gen_s) else None,
            "acceptance": round(sum(r["accepted_prediction_tokens"] for r in rows) / max(tok[1], 1), 4),
            "kinds": {k: sum(r["kind"] == k for r in rows) for k in ("rename", "docstring", "signature")}}


def bench_rss(a, srv: ServerProc) -> dict:
    convs = [[{"role": "system", "content": f"You are assistant number {k}. Answer in one short sentence."}]
             for k in range(4)]
    points = {}
    for i in range(1, a.requests + 1):
        kind = i % 5
        if kind == 4 and i % 20 == 4:
            srv.hang_up([{"role": "user", "content": f"Tell a long story number {i}."}])
        elif kind == 3:
            code = f"def f{i}(x):\n    return x + {i}\n"
            srv.chat([{"role": "user", "content": f"Rename f{i} to g{i}:\n{code}"}], 16,
                     prediction={"type": "content", "content": code})
        else:
            conv = convs[i % 4]
            conv.append({"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]})
            t = srv.chat(conv, 8)
            conv.append({"role": "assistant", "content": t.text})
            if len(conv) > 9:
                del conv[1:3]
        if i in (a.rss_early, a.requests):
            time.sleep(0.5)
            points[i] = srv.metric("edgespec_rss_bytes")
            print(f"  rss after {i} requests: {points[i] / 2**20:.1f} MiB", flush=True)
    early, late = points.get(a.rss_early), points.get(a.requests)
    return {"rss_bytes": {str(k): v for k, v in points.items()},
            "growth": round((late - early) / early, 4) if early and late else None,
            "prompt_cache_bytes": srv.metric("edgespec_prompt_cache_bytes")}


def main(argv: list[str] | None = None, prog: str = "python -m edgespec.benches.server") -> int:
    """Run the server bench with ``argv`` (default: this process's arguments); ``prog`` names the command in
    ``--help`` and in the report (``edgespec bench --server`` passes its own name)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--draft", default="auto", help="the server's and the in-process drafter (default auto)")
    ap.add_argument("--exact", action="store_true", help="verify batches bit-identical to plain decoding")
    ap.add_argument("--adapt", default="off", choices=["auto", "on", "off"],
                    help="online adaptation (default off: background training in one process would take CPU from "
                         "the other's timed request)")
    ap.add_argument("--sections", default="overhead,cache,prediction,rss")
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--conv-tokens", type=int, default=1500)
    ap.add_argument("--turns", type=int, default=3, help="turns per conversation (the first one primes it)")
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--edits", type=int, default=12)
    ap.add_argument("--edit-extra-tokens", type=int, default=64, help="max_tokens of an edit: its code's + this")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rss-early", type=int, default=10)
    ap.add_argument("--stream-interval", type=float, default=0, help="the server's --stream-interval (ms)")
    ap.add_argument("--out", default="bench_out/server")
    a = ap.parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = Options(a.model, a.threads, a.n_ctx, a.draft, a.exact, a.adapt)
    report: dict = {"meta": {"command": " ".join([prog, *argv]),
                             "options": asdict(opts), "args": vars(a), "machine": machine.describe(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid_cpus": os.cpu_count()}}
    rt = opts.load()
    try:
        if "cache" in sections:
            report["cache"] = bench_cache(a, rt, opts, out)
        if {"overhead", "prediction", "rss"} & set(sections):
            srv = ServerProc(opts, ["--stream-interval", str(a.stream_interval)], out / "serve.log")
            try:
                if "overhead" in sections:
                    print("overhead: server vs in-process", flush=True)
                    report["overhead"] = bench_overhead(a, rt, srv)
                if "prediction" in sections:
                    print("prediction: edits with and without a prediction", flush=True)
                    report["prediction"] = bench_prediction(a, rt, srv)
                if "rss" in sections:
                    print("rss: many requests", flush=True)
                    report["rss"] = bench_rss(a, srv)
            finally:
                report["meta"]["server_exit_code"] = srv.stop()
    finally:
        rt.close()
    report["summary"] = summary(report)
    path = out / "server_bench.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {path}")
    return 0


def summary(r: dict) -> dict:
    s: dict = {}
    if "overhead" in r:
        o = r["overhead"]
        s["server_vs_inprocess_tok_s"] = o["tok_s_ratio_median"]
        s["added_ttft_ms"] = o["added_ttft_ms_median"]
        s["overhead_same_text"] = f"{o['same_text']}/{o['n']}"
    if "cache" in r:
        c = r["cache"]
        s["switched_turn_ttft_ms"] = {"with_cache": c["with_cache"]["switched_ttft_ms_median"],
                                      "without_cache": c["without_cache"]["switched_ttft_ms_median"],
                                      "fresh_50_token_prompt": c["with_cache"]["fresh_50_ttft_ms_median"]}
        s["switched_vs_fresh_50"] = c.get("switched_vs_fresh_50")
        s["cache_same_text"] = f"{sum(c['same_text'])}/{len(c['same_text'])}"
    if "prediction" in r:
        p = r["prediction"]
        s["prediction_tok_s_ratio"] = p["tok_s_ratio_median"]
        s["prediction_acceptance"] = p["acceptance"]
        parted = f", {p['near_ties']} near-tie, {p['mismatches']} mismatch" if p["same_text"] < p["n"] else ""
        s["prediction_same_text"] = f"{p['same_text']}/{p['n']}{parted}"
    if "rss" in r:
        s["rss_growth"] = r["rss"]["growth"]
    return s


if __name__ == "__main__":
    sys.exit(main())
