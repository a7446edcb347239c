"""Replay drafters offline on recorded greedy outputs, priced with a measured verify-cost table.

A speed bench takes 15 minutes per prompt set; this answers "how fast could drafter X be here?" in seconds,
for drafters whose proposals do not depend on timing. ``record`` runs plain greedy decoding over the bench
prompt sets once (and, with ``--hidden``, keeps the target's hidden state at every output position for the
ReDrafter); ``replay`` walks each output as the speculative loop would (the controller, the drafter's
``propose``/``observe``, acceptance = the longest matching prefix of the recorded output) and counts verify
cost from the c(n) table instead of a clock. Drafting itself is counted free, so a replayed speedup is an
upper bound for drafters with a real draft cost. ``--oracle`` also replays each drafter with perfect gating
(only its accepted prefix is verified): what any confidence estimate on top of it could reach.

    python scripts/draft_replay.py record --out ~/.cache/edgespec/replay.json --hidden
    python scripts/draft_replay.py replay ~/.cache/edgespec/replay.json --drafters ngram,redrafter+gate --oracle

``from-bench`` takes the recorded outputs from a speed bench's ``results.json`` instead (its ``plain`` runs, with
the prompts rebuilt from the set; sets whose prompts hold the model's own earlier answers cannot be rebuilt):

    python scripts/draft_replay.py from-bench docs/bench/s13/summarize15.json --out /tmp/summarize.json
    python scripts/draft_replay.py replay /tmp/summarize.json --drafters suffix,ngram --oracle --costs 2:1.45,...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgespec.backends.gguf_file import GgufFile
from edgespec.controller import controller_for
from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult

SETS = (("humaneval", 20), ("chat", 20), ("adversarial", 10))
# c(n) of session 9's HumanEval run (Intel Xeon family 6 model 167, 2 threads), docs/bench/history.md
XEON_S9 = "1:1.0,2:1.65,3:2.05,4:1.93,5:2.50,6:2.89,8:3.52,12:4.40,16:4.36"


def record(args) -> None:
    from edgespec.benches.prompts import load_prompts
    from edgespec.benches.speed import Bench, parse_method

    bench = Bench(args.model, [parse_method("plain")], 4096, args.threads, args.max_tokens)
    out, hidden = {}, {}
    sets = [(k, int(n)) for k, n in (x.split(":") for x in args.sets.split(","))] if args.sets else SETS
    for kind, n in sets:
        out[kind] = []
        for k, prompt in enumerate(load_prompts(kind, min(n, args.n or n), bench.target)):
            tokens = bench.run(bench.methods[0], prompt).tokens
            out[kind].append({"prompt": prompt, "out": tokens})
            if args.hidden or args.probs:  # row i: the target's outputs that produced out[i] (the root of step i)
                b = bench.target
                b.truncate(0)
                first = b.prefill(prompt, want_hidden=args.hidden)
                rest = b.forward(tokens[:-1], [-1] + list(range(len(tokens) - 2)), want_hidden=args.hidden) \
                    if len(tokens) > 1 else None
                b.truncate(0)
                if args.hidden:
                    rows = [first.hidden[0]] + (list(rest.hidden) if rest is not None else [])
                    hidden[f"{kind}_{k}"] = np.stack(rows).astype(np.float16)
                if args.probs:  # the target's probability of each output token (greedy: its top one)
                    logits = np.concatenate([first.logits[-1:]] + ([rest.logits] if rest is not None else []))
                    p = [root_prob(row, t) for row, t in zip(logits, tokens, strict=True)]
                    out[kind][-1]["p"] = [round(x, 5) for x in p]
            print(kind, k, len(tokens), flush=True)
    bench.close()
    Path(args.out).write_text(json.dumps({"model": args.model, "sets": out}))
    if args.hidden:
        np.savez(Path(args.out).with_suffix(".hidden.npz"), **hidden)


def root_prob(logits: np.ndarray, token: int) -> float:
    """The probability a row of target logits gives ``token`` (its softmax)."""
    m = logits.max()
    return float(np.exp(logits[token] - m) / np.exp(logits - m, dtype=np.float32).sum())


def from_bench(args) -> None:
    from edgespec import registry
    from edgespec.backends.llama_cpp import LlamaCppBackend
    from edgespec.benches.prompts import load_prompts

    res = json.loads(Path(args.results).read_text())
    meta = res["meta"]
    if meta["prompts"] in ("revision", "code-revision"):
        raise SystemExit("the code-revision prompts hold the model's own answers: use record")
    runs = res["per_prompt"]["plain"]
    backend = LlamaCppBackend(registry.resolve(meta["model"]), n_ctx=4096, n_threads=1)
    prompts = load_prompts(meta["prompts"], len(runs), backend)
    backend.close()
    sets = {meta["prompts"]: [{"prompt": p, "out": r["tokens"]} for p, r in zip(prompts, runs, strict=True)]}
    Path(args.out).write_text(json.dumps({"model": meta["model"], "sets": sets,
                                          "costs": meta.get("verify_cost")}))
    print(f"{len(runs)} outputs of {meta['prompts']}; c(n) of that run: {meta.get('verify_cost')}")


def accepted_path(tree: DraftTree, truth: list[int]) -> list[int]:
    """The nodes the target accepts when its greedy continuation is ``truth``."""
    path, node = [], -1
    for t in truth:
        nxt = next((i for i, p in enumerate(tree.parents) if p == node and tree.tokens[i] == t), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def oracle_cut(tree: DraftTree, truth: list[int], shape: TreeShape) -> DraftTree:
    """Perfect gating: only the accepted chain, cut where the cost table stops paying for it."""
    toks = [tree.tokens[i] for i in accepted_path(tree, truth)]
    k = shape.keep([1.0] * len(toks))
    return DraftTree(toks[:k], list(range(-1, k - 1)))


def replay_one(drafter, prompt, out, costs, hidden=None, oracle=False) -> tuple[int, float, int]:
    """(tokens, cost in plain steps, verifies) of one recorded output."""
    drafter.reset()
    ctl = controller_for(drafter, costs=dict(costs))
    i, tokens, cost, verifies = 0, 0, 0.0, 0
    while i < len(out) - 1:
        cached, truth = prompt + out[:i], out[i + 1:]
        shape = ctl.next_shape(len(out) - 1 - i, len(cached))
        tree = DraftTree()
        if shape.depth:
            h = None if hidden is None else hidden[i].astype(np.float32)
            ask = TreeShape(8, shape.width, 16) if oracle else shape
            tree = drafter.propose(DraftContext(cached, out[i], h, None), ask)
            if oracle:
                tree = oracle_cut(tree, truth, shape)
        acc = accepted_path(tree, truth)
        n = len(tree) + 1
        nxt = i + len(acc) + 1
        if len(tree) and not oracle:
            drafter.observe(VerifyResult(tree, acc, out[nxt] if nxt < len(out) else -1, root=out[i]))
        ctl.observe(tree, acc, 0.0, ctl.verify_cost(n))
        tokens, verifies, i = tokens + len(acc) + 1, verifies + 1, nxt
        cost += ctl.verify_cost(n) / ctl.verify_cost(1)
    return tokens, cost, verifies


_TOKENIZER = None  # the target's backend, for the suffix drafter's views (loaded once)


def make_drafter(spec: str, model: str):
    """A drafter from a bench method spec (``ngram``, ``redrafter[:path][+gate]``), checked as the bench checks it."""
    from edgespec import drafters, registry
    from edgespec.benches.speed import parse_method
    from edgespec.models.drafting.ngram import NgramDrafter
    from edgespec.models.drafting.redrafter import ReDrafter

    try:
        m = parse_method(spec)
        d = drafters.parse(m.drafter, model) if m.kind == "spec" else None
    except (ValueError, registry.ModelError) as e:
        raise SystemExit(f"{spec}: {e}") from e
    if d is None or d.kind not in ("ngram", "redrafter", "suffix"):
        raise SystemExit(f"replay knows ngram, suffix and redrafter[:path][+gate], not {spec!r}")
    if d.kind == "ngram":
        return NgramDrafter()
    if d.kind == "suffix":  # as the runtime makes it: with the JSON-escaped views of each prompt
        from edgespec.backends.llama_cpp import LlamaCppBackend
        from edgespec.models.drafting.suffix import SuffixDrafter
        from edgespec.models.drafting.views import json_views

        global _TOKENIZER
        if _TOKENIZER is None:
            _TOKENIZER = LlamaCppBackend(registry.resolve(model), n_ctx=512, n_threads=1)
        return SuffixDrafter(views=json_views(_TOKENIZER))
    return ReDrafter(Path(d.arg), GgufFile(registry.resolve(model)), self_gating=m.gate)


def parse_costs(text: str) -> dict[int, float]:
    """A c(n) table from ``n:cost,...``."""
    return {int(k): float(v) for k, v in (kv.split(":") for kv in text.split(","))}


def replay(args) -> None:
    data = json.loads(Path(args.outputs).read_text())
    hid_path = Path(args.outputs).with_suffix(".hidden.npz")
    hidden = np.load(hid_path) if hid_path.exists() else None
    recorded = ",".join(f"{k}:{v}" for k, v in (data.get("costs") or {}).items())
    costs = parse_costs(args.costs or recorded or XEON_S9)
    print(f"c(n): {costs}")
    for spec in args.drafters.split(","):
        for oracle in (False, True) if args.oracle else (False,):
            for kind in data["sets"]:
                d = make_drafter(spec, data["model"])
                if d.needs_hidden and hidden is None:
                    raise SystemExit(f"{spec} needs hidden states: record with --hidden")
                per, tpv = [], []
                for k, x in enumerate(data["sets"][kind]):
                    h = hidden[f"{kind}_{k}"] if d.needs_hidden else None
                    tok, cost, ver = replay_one(d, x["prompt"], x["out"], costs, h, oracle)
                    per.append(tok / cost if cost else 1.0)
                    tpv.append(tok / max(ver, 1))
                q = np.percentile(per, [25, 50, 75])
                print(f"{spec}{' oracle-gated' if oracle else ''} {kind}: speedup {q[1]:.3f}x [{q[0]:.3f}-{q[2]:.3f}], "
                      f"tokens/verify {np.mean(tpv):.2f}", flush=True)


def gating(args) -> None:
    """How well could any gating rule do? Every step where the suffix drafter has a match: its chain (up to 16
    nodes, ungated), how much of it the target accepts, and the features a rule could use (match length, the
    drafter's prior chance of its first node, the target's probability of the root when recorded with --probs).
    Prints the chance of going on copying per match length and depth, and the gain (plain steps saved) of perfect
    gating against the best fixed rule per feature bucket, fitted on the same data (an upper bound for rules)."""
    from collections import defaultdict

    from edgespec.models.drafting.suffix import SuffixDrafter

    data = json.loads(Path(args.outputs).read_text())
    costs = parse_costs(args.costs or XEON_S9)
    ctl = controller_for(None, costs=costs)
    env = [0.0] + [ctl.envelope(n) for n in range(1, 18)]  # the cheapest verify of at least n rows
    rows = []
    for items in data["sets"].values():
        d = SuffixDrafter()
        for x in items:
            d.reset()
            prompt, out, probs = x["prompt"], x["out"], x.get("p")
            for i in range(len(out) - 1):
                d._sync(prompt + out[:i], out[i])
                occ = d.request_index.match(d.history, d.cfg.max_match)
                if not occ:
                    continue
                length = max(m for _, m in occ)
                nodes, _ = d._grow(d.request_index, [e for e, m in occ if m == length], length, 0,
                                   TreeShape(16, 1, 16))
                if nodes:
                    tree = DraftTree([n.token for n in nodes], [n.parent for n in nodes])
                    rows.append({"L": length, "p0": nodes[0].p, "pr": probs[i] if probs else 1.0, "n": len(nodes),
                                 "acc": len(accepted_path(tree, out[i + 1:]))})

    def gain(r, k):  # draft the chain's first k nodes
        k = min(k, r["n"])
        return min(r["acc"], k) - (env[k + 1] - 1) if k else 0.0

    print(f"{len(rows)} steps with a match; c(n): {costs}")
    for lo, hi in ((1, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 12), (12, 33)):
        g = [r for r in rows if lo <= r["L"] < hi]
        line = []
        for depth in range(1, 7):
            tried = [r for r in g if r["n"] >= depth and r["acc"] >= depth - 1]
            if len(tried) >= 5:
                line.append(f"d{depth} {np.mean([r['acc'] >= depth for r in tried]):.2f}")
        print(f"match {lo}-{hi - 1} ({len(g)} steps): chance of going on copying " + ", ".join(line))
    perfect = sum(max(gain(r, k) for k in range(17)) for r in rows)
    rules = {"match length": lambda r: min(r["L"], 12),
             "match length, first node's chance": lambda r: (min(r["L"], 12), round(r["p0"] * 5)),
             "+ target's root probability": lambda r: (min(r["L"], 12), round(r["p0"] * 5), r["pr"] > 0.9)}
    for name, key in rules.items():
        groups = defaultdict(list)
        for r in rows:
            groups[key(r)].append(r)
        best = sum(max(sum(gain(r, k) for r in g) for k in range(17)) for g in groups.values())
        print(f"best fixed rule on {name}: {best:.0f} plain steps saved of perfect gating's {perfect:.0f} "
              f"({best / perfect:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="greedy outputs of the bench prompt sets (and hidden states)")
    r.add_argument("--model", default="qwen2.5-coder-1.5b")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--hidden", action="store_true", help="also keep hidden states (for ReDrafter replay)")
    r.add_argument("--probs", action="store_true", help="also keep the target's probability of each output token")
    r.add_argument("--n", type=int, default=None, help="at most this many prompts per set (default: the bench's)")
    r.add_argument("--sets", default=None, help="set:n,... (default: humaneval:20,chat:20,adversarial:10)")
    r.add_argument("--out", required=True)
    p = sub.add_parser("replay", help="replay drafters on recorded outputs")
    p.add_argument("outputs")
    p.add_argument("--drafters", default="ngram")
    p.add_argument("--costs", default=None,
                   help="c(n) as n:cost,... in single steps (default: the recorded run's, else session 9's Xeon)")
    p.add_argument("--oracle", action="store_true", help="also replay with perfect gating")
    g = sub.add_parser("gating", help="how well any gating rule of the suffix drafter could do on recorded outputs")
    g.add_argument("outputs")
    g.add_argument("--costs", default=None, help="c(n) as n:cost,... (default: session 9's Xeon)")
    b = sub.add_parser("from-bench", help="outputs and prompts from a speed bench's results.json")
    b.add_argument("results")
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    {"record": record, "replay": replay, "from-bench": from_bench, "gating": gating}[args.cmd](args)


if __name__ == "__main__":
    main()
