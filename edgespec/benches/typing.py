"""Typing bench (issue 28): code completion at an editor's cursor, as llama.vscode asks for it, against
llama-cpp-python's own ``create_completion`` on the same FIM prompt.

For each of >= 10 real source files from installed packages, a scripted session moves the cursor to a few places
inside functions and retypes a few lines in a row there, a few characters at a time; at every pause one request goes
to a real ``edgespec serve`` subprocess in llama.vscode's shape (``POST /infill``: ``input_prefix`` of up to 256
lines, ``prompt`` the cursor line so far, ``input_suffix`` of up to 64 lines, 2-4 ``input_extra`` chunks from other
files of the same package, ``n_predict``, ``n_indent`` the line's indentation, top_k 40, top_p 0.99, streamed so
that times are the client's). The anchor, interleaved request by request (the order alternates), is
``llama_cpp.Llama.create_completion`` on the same prompt tokens (``infill.fim_prompt`` of the prefix as the server
anchors it, ``server_infill.Editors``) with the same stops applied to its stream (``LineStop``), greedy, and no
reuse across requests (``reset()`` before each).

Per request: time to first text, time to the whole completion, prompt tokens evaluated and cached, tokens per
verify, and whether the texts agree. The summary gives p50/p90 of both times on both sides, the median ratio
of whole-completion times (edgespec / llama-cpp-python) and the share of prompt tokens served from the cache
after each file's first request.

Real run (the machine otherwise idle; about 15-30 minutes per model on 2 cores):

    python -m edgespec.benches.typing --model qwen2.5-coder-0.5b --threads 2 --out bench_out/typing
    python -m edgespec.benches.typing --model qwen2.5-coder-1.5b --threads 2 --out bench_out/typing-1.5b

A tiny end-to-end check: ``--files 1 --positions 1 --lines 1 --pauses 2 --n-predict 8``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgespec import machine, registry
from edgespec.benches.server import Options, ServerProc, installed_sources
from edgespec.generate import LineStop
from edgespec.infill import fim_prompt
from edgespec.server_infill import ANCHOR_CHARS_PER_TOKEN, Editors

N_PREFIX, N_SUFFIX = 256, 64  # llama.vscode's default lines before and after the cursor
CHUNK_LINES = 64  # llama.vscode's ring-buffer chunk size


@dataclass
class Pause:
    """One request: the editor's state at a pause in typing."""

    file: str
    line: int
    prefix: str  # input_prefix: the lines before the cursor line
    prompt: str  # the cursor line up to the cursor
    suffix: str  # input_suffix: the rest of the line and the lines after
    n_indent: int


@dataclass
class Timing:
    text: str
    ttft_s: float
    total_s: float
    prompt_tokens: int = 0
    evaluated: int = 0  # prompt tokens evaluated (the rest came from the cache)
    generated: int = 0
    tokens_per_verify: float | None = None


def candidate_lines(lines: list[str]) -> list[int]:
    """Lines inside a block (indented code of 16-80 characters, not comments or docstrings) to retype."""
    out = []
    for i, ln in enumerate(lines):
        body = ln.strip()
        if ln.startswith("    ") and 16 <= len(ln) <= 80 and body[:1] not in ("#", '"', "'", "") and i > 10:
            out.append(i)
    return out


def session(name: str, text: str, positions: int, pauses: int, step: int, run: int = 2) -> list[Pause]:
    """The pauses of a scripted session on one file: ``positions`` places spread over it, where ``run`` lines in a
    row are retyped from their indentation, a pause every ``step`` characters (``pauses`` per line)."""
    lines = text.splitlines()
    cands = candidate_lines(lines)
    if not cands:
        return []
    picks = [cands[(k * len(cands)) // positions] for k in range(positions)] if len(cands) >= positions else cands
    picks = [i + d for i in picks for d in range(run) if i + d < len(lines)]
    out = []
    for i in picks:
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        before = "\n".join(lines[max(0, i - N_PREFIX):i]) + "\n"
        after = "\n".join(lines[i + 1:i + 1 + N_SUFFIX]) + "\n"
        for k in range(pauses):
            typed = line[:min(len(line), indent + k * step)]
            out.append(Pause(name, i + 1, before, typed, "\n" + after, indent))
    return out


def extra_chunks(module: str, n: int) -> list[dict]:
    """``n`` chunks of ``CHUNK_LINES`` lines from the middle of other ``.py`` files beside ``module``'s."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    here = Path(spec.origin)
    out = []
    for p in sorted(here.parent.glob("*.py")):
        if p == here or p.name.startswith("_") and p.name != "__init__.py":
            continue
        lines = p.read_text(errors="replace").splitlines()
        if len(lines) < 20:
            continue
        mid = max(0, len(lines) // 2 - CHUNK_LINES // 2)
        out.append({"text": "\n".join(lines[mid:mid + CHUNK_LINES]) + "\n", "time": int(time.time() * 1000),
                    "filename": str(p.relative_to(here.parent.parent))})  # llama.vscode's chunk
        if len(out) == n:
            break
    return out


def body(p: Pause, chunks: list[dict], n_predict: int, t_max_ms: float) -> dict:
    """llama.vscode's request (``createRequestPayload``), streamed."""
    return {"input_prefix": p.prefix, "input_suffix": p.suffix, "input_extra": chunks, "prompt": p.prompt,
            "n_predict": n_predict, "top_k": 40, "top_p": 0.99, "stream": True,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
            **({"n_indent": p.n_indent} if p.n_indent else {}), "t_max_prompt_ms": 500, "t_max_predict_ms": t_max_ms}


def ask_server(srv: ServerProc, req: dict) -> Timing:
    t0 = time.perf_counter()
    first, parts, final = None, [], None
    for obj in srv.events("/infill", req):
        if obj.get("content"):
            first = first or time.perf_counter()
            parts.append(obj["content"])
        if obj.get("stop"):
            final = obj
    total = time.perf_counter() - t0
    t = final["timings"]
    return Timing("".join(parts), (first - t0) if first else total, total, final["tokens_evaluated"], t["prompt_n"],
                  final["tokens_predicted"], final["edgespec"]["tokens_per_verify"])


def ask_anchor(llm, tokens: list[int], p: Pause, n_predict: int, t_max_ms: float) -> Timing:
    """llama-cpp-python on the same prompt tokens, no reuse, greedy, with the same editor stops."""
    llm.reset()
    lines = LineStop(p.n_indent, t_max_ms / 1000)
    t0 = time.perf_counter()
    first, text, n = None, "", 0
    for chunk in llm.create_completion(tokens, max_tokens=n_predict, temperature=0.0, top_k=40, top_p=0.99,
                                       stream=True):
        n += 1
        piece = chunk["choices"][0]["text"]
        if n == 1:
            lines.start = time.perf_counter()  # the time limit counts from the first token, as the server's
        if piece and first is None:
            first = time.perf_counter()
        text += piece
        cut = lines.cut(text)
        if cut is not None:
            text = text[:cut]
            break
    total = time.perf_counter() - t0
    return Timing(text, (first - t0) if first else total, total, len(tokens), len(tokens), n)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def latencies(timings: list[dict]) -> dict:
    """p50 and p90 of the time to first text and to the whole completion."""
    return {f"{k}_p{q}": pct([t[k + "_s"] for t in timings], q / 100) for k in ("ttft", "total") for q in (50, 90)}


def summary(rows: list[dict]) -> dict:
    es = [r["edgespec"] for r in rows]
    an = [r["anchor"] for r in rows]
    later = [r["edgespec"] for r in rows if not r["first_of_file"]]
    ratio = [e["total_s"] / a["total_s"] for e, a in zip(es, an, strict=True) if a["total_s"] > 0]
    tpv = [e["tokens_per_verify"] for e in es if e["tokens_per_verify"]]
    cached = 1 - sum(e["evaluated"] for e in later) / sum(e["prompt_tokens"] for e in later) if later else None
    return {"requests": len(rows), "edgespec": latencies(es), "llama_cpp_python": latencies(an),
            "total_ratio_median": round(statistics.median(ratio), 3) if ratio else None,
            "cached_share_after_first": round(cached, 3) if cached is not None else None,
            "tokens_per_verify_mean": round(statistics.mean(tpv), 3) if tpv else None,
            "same_text": sum(r["same_text"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgespec.benches.typing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--draft", default="auto")
    ap.add_argument("--files", type=int, default=10, help="source files (default 10; at least 10 for a real run)")
    ap.add_argument("--positions", type=int, default=4, help="cursor lines per file (default 4)")
    ap.add_argument("--lines", type=int, default=2, help="lines in a row retyped at each place (default 2)")
    ap.add_argument("--pauses", type=int, default=4, help="requests per line, one per pause (default 4)")
    ap.add_argument("--step", type=int, default=4, help="characters typed between pauses (default 4)")
    ap.add_argument("--chunks", type=int, default=3, help="input_extra chunks from the same package (2-4; default 3)")
    ap.add_argument("--n-predict", type=int, default=128, help="llama.vscode's n_predict (default 128)")
    ap.add_argument("--t-max-predict-ms", type=float, default=0,
                    help="t_max_predict_ms on both sides (default 0: off, so both complete the same text)")
    ap.add_argument("--out", default="bench_out/typing")
    a = ap.parse_args(argv)
    import llama_cpp

    from edgespec.backends.llama_cpp import LlamaCppBackend

    path = str(registry.pull(a.model))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    srv = ServerProc(Options(a.model, a.threads, a.n_ctx, a.draft, False, "off"), [], out / "server.log")
    rows: list[dict] = []
    try:
        tok = LlamaCppBackend(path, n_ctx=a.n_ctx, n_threads=1)  # the prompt's tokens, as the server makes them
        llm = llama_cpp.Llama(path, n_ctx=a.n_ctx, n_threads=a.threads, n_batch=512, verbose=False)
        files = list(installed_sources())[:a.files]
        editors = Editors()
        for fi, (module, text) in enumerate(files):
            chunks = extra_chunks(module, a.chunks)
            for k, p in enumerate(session(module, text, a.positions, a.pauses, a.step, a.lines)):
                prefix = editors.anchor("bench", p.prefix, a.n_ctx * ANCHOR_CHARS_PER_TOKEN)  # as the server does
                fp = fim_prompt(tok, prefix, p.suffix, chunks, p.prompt, reserve=min(a.n_predict, a.n_ctx // 2))
                req = body(p, chunks, a.n_predict, a.t_max_predict_ms)
                if (fi + k) % 2 == 0:
                    es = ask_server(srv, req)
                    an = ask_anchor(llm, fp.tokens, p, a.n_predict, a.t_max_predict_ms)
                else:
                    an = ask_anchor(llm, fp.tokens, p, a.n_predict, a.t_max_predict_ms)
                    es = ask_server(srv, req)
                rows.append({"file": module, "line": p.line, "typed": len(p.prompt) - p.n_indent,
                             "first_of_file": k == 0, "edgespec": asdict(es), "anchor": asdict(an),
                             "same_text": es.text == an.text})
                print(f"{module}:{p.line} +{len(p.prompt) - p.n_indent}: edgespec {es.total_s * 1000:.0f} ms "
                      f"({es.evaluated}/{es.prompt_tokens} evaluated, {es.tokens_per_verify} tok/verify), "
                      f"llama-cpp-python {an.total_s * 1000:.0f} ms", file=sys.stderr, flush=True)
        tok.close()
    finally:
        srv.stop()
    result = {"summary": summary(rows), "rows": rows, "args": vars(a), "machine": machine.describe()}
    (out / "typing_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
