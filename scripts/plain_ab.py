"""A/B of plain-decoding settings of the llama.cpp backend against llama-cpp-python's own loop.

Every variant is its own context on the same model; the prompts are run round-robin (variant order rotated
each prompt), greedy, with EOS honoured, and each variant's tok/s is the median over prompts, reported
with the ratio to llama-cpp-python's loop measured in the same rounds.

    .venv/bin/python scripts/plain_ab.py --model qwen2.5-coder-1.5b --n 10 --max-tokens 128
    .venv/bin/python scripts/plain_ab.py --prompts chat --variants "hidden off;hidden off, 1 seq"
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgespec import registry
from edgespec.backends.llama_cpp import LlamaCppBackend
from edgespec.benches.prompts import load_prompts

VARIANTS = {
    # name: (backend kwargs, plain decode reads the hidden state)
    "old (hidden on, 8 seqs, unified)": ({}, True),
    "hidden off": ({}, False),
    "hidden off, 1 seq": ({"n_seq_max": 1, "kv_unified": False}, False),
    "hidden off, mmap": ({"mmap": True}, False),
    # last: a 4 KiB-page context made after the huge-page ones cannot share (merge into) their mappings
    "hidden off, 4 KiB pages": ({"huge_pages": False}, False),
}


def run_backend(b: LlamaCppBackend, prompt: list[int], max_tokens: int, hidden: bool) -> float:
    b.truncate(0)
    out = b.prefill(prompt)
    tok = int(np.argmax(out.logits[-1]))
    n, t0 = 0, time.perf_counter()
    while tok not in b.info.eog and n < max_tokens:
        o = b.forward([tok], [-1], want_hidden=hidden)
        b.commit([0])
        tok = int(np.argmax(o.logits[0]))
        n += 1
    return n / (time.perf_counter() - t0)


def run_llama(llm, prompt: list[int], max_tokens: int, eog) -> float:
    n, t_first = 0, None
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        if tok in eog or n >= max_tokens:
            break
        n += 1
    return (n - 1) / (time.perf_counter() - t_first) if n > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--prompts", default="humaneval", help="humaneval, chat or adversarial")
    ap.add_argument("--variants", default=None, help="variant names separated by ; (default: all)")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from llama_cpp import Llama

    path = registry.resolve(a.model)
    wanted = [v.strip() for v in a.variants.split(";")] if a.variants else list(VARIANTS)
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    variants = {k: VARIANTS[k] for k in VARIANTS if k in wanted}  # in VARIANTS' order (4 KiB pages last)
    backends = {k: LlamaCppBackend(path, n_ctx=2048, n_threads=a.threads, **kw) for k, (kw, _) in variants.items()}
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, flash_attn=True,
                verbose=False)
    first = next(iter(backends.values()))
    prompts = load_prompts(a.prompts, a.n, first)
    names = list(variants) + ["llama-python"]
    rates: dict[str, list[float]] = {k: [] for k in names}
    for i, p in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            if k == "llama-python":
                rates[k].append(run_llama(llm, p, a.max_tokens, first.info.eog))
            else:
                rates[k].append(run_backend(backends[k], p, a.max_tokens, variants[k][1]))
    base = np.array(rates["llama-python"])
    report = {}
    for k in names:
        r = np.array(rates[k])
        ratio = r / base
        report[k] = {"tok_s_median": float(np.median(r)), "vs_llama_python_median": float(np.median(ratio)),
                     "vs_llama_python_p25_p75": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))]}
        print(f"{k:<34} {np.median(r):6.2f} tok/s   x{np.median(ratio):.3f} "
              f"[{np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f}] of llama-python")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "report": report, "rates": rates}, f, indent=1)


if __name__ == "__main__":
    main()
