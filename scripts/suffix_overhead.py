"""What suffix drafting costs per generated token: a cross-request index of 64k tokens of real text (standard-library
sources, tokenized with the model's vocabulary), then requests replayed through the drafter as the decoding loop runs
it (propose, a verify that accepts the matching path, observe). Prints ms per generated token, the share of tokens
accepted, and the index's resident bytes per token (``suffix.BYTES_PER_TOKEN``).

    .venv/bin/python scripts/suffix_overhead.py [--model qwen2.5-coder-0.5b] [--tokens 65536] [--requests 8]
"""

from __future__ import annotations

import argparse
import functools
import gc
import sysconfig
import time
import tracemalloc
from pathlib import Path

from edgespec import registry
from edgespec.models.drafting.drafter import DraftContext, TreeShape, VerifyResult
from edgespec.models.drafting.suffix import SuffixDrafter
from edgespec.models.drafting.views import JsonViews

# marginal verify costs in plain steps, as on a 2-core Xeon (c(2) ~1.5, c(4) ~1.7, c(8) ~2.9)
SHAPE = TreeShape(depth=16, width=4, max_nodes=16, node_cost=(0.5, 0.15, 0.05, 0.3, 0.3, 0.3, 0.3, 0.3) + (0.2,) * 8)


def documents(tokenize, total: int, skip: int = 0) -> list[list[int]]:
    """Standard-library sources as token lists (at most 2,048 tokens each) until ``total`` tokens."""
    out, n = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip:]:
        toks = tokenize(path.read_text(errors="replace"))[:2048]
        out.append(toks)
        n += len(toks)
        if n >= total:
            break
    return out


def replay(d: SuffixDrafter, text: list[int]) -> tuple[float, int, int]:
    """Decode ``text`` as the loop would, the verify accepting the draft's path that matches it. Returns the seconds
    spent in the drafter (archiving the request before included), tokens generated and tokens accepted from drafts."""
    t0 = time.perf_counter()
    d.reset()  # the request before goes into the cross-request index
    prompt = 64
    pos, spent, accepted = prompt, time.perf_counter() - t0, 0
    while pos < len(text) - 1:
        t0 = time.perf_counter()
        tree = d.propose(DraftContext(text[:pos], text[pos], None, None), SHAPE)
        acc, node = [], -1
        while True:
            nxt = text[pos + 1 + len(acc)] if pos + 1 + len(acc) < len(text) else -1
            child = next((c for c in tree.children(node) if tree.tokens[c] == nxt), None)
            if child is None:
                break
            acc.append(child)
            node = child
        d.observe(VerifyResult(tree, acc, text[min(pos + 1 + len(acc), len(text) - 1)]))
        spent += time.perf_counter() - t0
        accepted += len(acc)
        pos += len(acc) + 1
    return spent, len(text) - prompt, accepted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--requests", type=int, default=8)
    a = ap.parse_args()
    import llama_cpp

    llm = llama_cpp.Llama(str(registry.resolve(a.model)), vocab_only=True, verbose=False)
    tokenize = lambda s: llm.tokenize(s.encode(), add_bos=False, special=False)  # noqa: E731
    docs = documents(tokenize, a.tokens)
    d = SuffixDrafter()
    t0 = time.perf_counter()
    for doc in docs:
        d.global_index.add(doc)
    build = time.perf_counter() - t0
    n = d.global_index.live
    gc.collect()
    tracemalloc.start()  # the resident bytes of a second index of the same text (traced: slower to build)
    other = SuffixDrafter()
    for doc in docs:
        other.global_index.add(doc)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del other
    print(f"cross-request index: {n} tokens in {len(docs)} documents, built in {build * 1e3:.0f} ms "
          f"({build / n * 1e6:.1f} us/token), {size / n:.0f} bytes/token")
    # requests: files the index holds (a revision of what was seen) and files it does not
    seen = docs[-a.requests // 2:]
    unseen = documents(tokenize, 1, skip=len(docs) + 1)[:1] + documents(tokenize, 4096, skip=len(docs) + 20)
    spent = gen = acc = 0
    for text in (seen + unseen)[:a.requests]:
        s, g, k = replay(d, text)
        spent, gen, acc = spent + s, gen + g, acc + k
    print(f"drafting + index updates: {spent / gen * 1e3:.4f} ms per generated token over {gen} tokens "
          f"({a.requests} requests, {acc / gen:.0%} of tokens accepted from drafts); index now {d.global_index.live}")
    # the prompt's JSON-escaped views: once per request, for a conversation that grows by a turn
    piece = functools.lru_cache(maxsize=None)(lambda t: llm.detokenize([t], special=False))  # as the backend caches
    v = SuffixDrafter(views=JsonViews(tokenize, piece))
    turns = docs[:3]
    prompt, times = [], []
    for turn in turns:
        prompt = prompt + [llm.token_eos()] + turn
        t0 = time.perf_counter()
        v.reset()
        v.propose(DraftContext(prompt, prompt[-1], None, None), SHAPE)  # the first step indexes the prompt
        times.append(time.perf_counter() - t0)
    print(f"a conversation's first step (the prompt and its views indexed): turn 1 ({len(turns[0])} tokens) "
          f"{times[0] * 1e3:.1f} ms, then "
          + ", ".join(f"{t * 1e3:.1f} ms" for t in times[1:]) + f" as it grows to {len(prompt)} tokens "
          f"(the view index then holds {v.view_index.live} tokens)")


if __name__ == "__main__":
    main()
