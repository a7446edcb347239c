"""``edgespec bench``: decoding methods side by side, interleaved on the same prompts in one process.

Methods (comma-separated):
* ``plain``: edgespec's plain decoding (the baseline every speedup is divided by);
* ``llama-python``: llama-cpp-python's own ``Llama.generate`` loop, no speculation;
* ``anchor-K``: llama-cpp-python with ``LlamaPromptLookupDecoding(num_pred_tokens=K)``;
* ``ngram`` and ``model:<id>``: edgespec drafters under the cost-aware controller, or with a fixed
  shape as ``ngram@2`` (depth 2) or ``ngram@2x3`` (depth 2, width 3).

For each prompt every method runs once, in a rotated order, so that machine noise hits all alike.
All greedy outputs are checked against ``plain``; a divergence is reported as a near-tie only where
plain decoding's top-2 logit margin at that token is below ``NEAR_TIE`` (batched verification uses
other matmul kernels, which move logits by up to ~0.5), and as a MISMATCH otherwise.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgespec import machine, registry
from edgespec.backends.base import common_prefix
from edgespec.benches.prompts import load_prompts
from edgespec.memory.live import peak_rss_bytes

NEAR_TIE = 0.75


@dataclass
class Method:
    name: str
    kind: str  # plain | spec | llama-python | anchor
    drafter: str | None = None
    depth: int | None = None
    width: int | None = None
    k: int = 0
    exact: bool = False  # verify only bit-exact batch sizes (``--exact``)
    gate: bool | None = None  # ReDrafter: gate each draft by its own calibrated confidence (``+gate``)


SUFFIXES = ("+exact", "+gate")


def parse_method(spec: str) -> Method:
    """``name[@depth[xwidth]][+exact][+gate]``, e.g. ``redrafter``, ``ngram@3``, ``redrafter+exact``,
    ``redrafter+gate`` (a self-gating ReDrafter: the cost-aware keep of its chain instead of the controller's
    depth)."""
    base, flags = spec, set()
    while base.endswith(SUFFIXES):
        flag = next(f for f in SUFFIXES if base.endswith(f))
        flags.add(flag)
        base = base[:-len(flag)]
    m = _parse_method(base)
    m.name, m.exact = spec, "+exact" in flags
    if "+gate" in flags:
        if not (m.drafter or "").startswith("redrafter"):
            raise ValueError(f"+gate applies to redrafter methods only, not {spec!r}")
        m.gate = True
    return m


def _parse_method(spec: str) -> Method:
    name, shape = (spec.split("@", 1) + [""])[:2]
    depth, width = None, None
    if shape:
        d, _, w = shape.partition("x")
        depth, width = int(d), int(w) if w else None
    if name == "plain":
        return Method(spec, "plain")
    if name == "llama-python":
        return Method(spec, "llama-python")
    if name.startswith("anchor-"):
        return Method(spec, "anchor", k=int(name.split("-", 1)[1]))
    if name in ("ngram", "suffix", "auto", "auto-noadapt", "redrafter") or \
            name.startswith(("model:", "redrafter:", "xvocab:")):
        return Method(spec, "spec", drafter=name, depth=depth, width=width)
    raise ValueError(f"unknown bench method {spec!r}")


@dataclass
class Run:
    tokens: list[int]
    tok_s: float
    stats: dict = field(default_factory=dict)


class Bench:
    def __init__(self, model: str, methods: list[Method], n_ctx: int, n_threads: int, max_tokens: int):
        from edgespec import drafters
        from edgespec.build import open_backend
        from edgespec.options import LoadOptions
        from edgespec.runtime import Runtime

        self.path = registry.resolve(model)
        self.methods = methods
        self.max_tokens = max_tokens
        self.n_threads = n_threads
        opts = LoadOptions(n_ctx=n_ctx, n_threads=n_threads, backend="llama.cpp")
        self.target = open_backend(self.path, opts)
        draft_open = lambda p: open_backend(p, opts)  # a draft model: the target's context, KV type and batch
        # every method runs through a Runtime on the one target, as the product does
        self.runtimes, self.llamas = {}, {}
        for m in methods:
            if m.kind in ("plain", "spec"):
                drafter = None
                if m.kind == "spec":
                    drafter = drafters.make(drafters.parse(m.drafter, model), self.target, model, draft_open)
                    if m.gate is not None:
                        drafter.self_gating = m.gate
                self.runtimes[m.name] = Runtime(self.target, model, drafter, m.width, m.depth, exact=m.exact)
            elif m.kind in ("anchor", "llama-python"):
                from llama_cpp import Llama
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                draft = LlamaPromptLookupDecoding(num_pred_tokens=m.k) if m.kind == "anchor" else None
                self.llamas[m.name] = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads,
                                            n_threads_batch=n_threads, flash_attn=True, verbose=False,
                                            draft_model=draft, logits_all=draft is not None)

    def run(self, m: Method, prompt: list[int]) -> Run:
        if m.kind in ("anchor", "llama-python"):
            return self._run_llama(self.llamas[m.name], prompt)
        from edgespec.options import Request

        self.target.truncate(0)
        gen = self.runtimes[m.name].start(prompt, Request(max_tokens=self.max_tokens))
        for _ in gen:
            pass
        return Run(gen.tokens, gen.stats.tok_s, gen.stats.as_dict())

    def _run_llama(self, llm, prompt: list[int]) -> Run:
        out, ttft, decode = llama_generate(llm, prompt, self.target.info.eog, self.max_tokens,
                                           top_k=1, top_p=1.0, min_p=0.0, temp=0.0)
        return Run(out, len(out) / decode if decode > 0 else 0.0, {"ttft_s": ttft})

    def margin_at(self, prompt: list[int], plain: list[int], i: int) -> float:
        return top2_margin(self.target, prompt + plain[:i])

    def close(self) -> None:
        for llm in self.llamas.values():
            llm.close()
        for rt in self.runtimes.values():
            if rt.drafter is not None:
                rt.drafter.close()
        self.target.close()


# ``--as-users``: each method is what ``edgespec.load`` gives with these options (the rest default, adaptation
# included), on a backend of its own; ``+exact`` adds exact=True
USER_METHODS = {"plain": {"draft": "none"}, "auto": {}, "auto-noadapt": {"adapt": False},
                "ngram": {"draft": "ngram"}, "suffix": {"draft": "suffix"}, "redrafter": {"draft": "redrafter"}}


def user_options(name: str) -> dict:
    base = name.removesuffix("+exact")
    if base not in USER_METHODS:
        raise ValueError(f"--as-users methods are {', '.join(USER_METHODS)} (each may end in +exact), not {name!r}")
    return {**USER_METHODS[base], **({"exact": True} if name.endswith("+exact") else {})}


class UserBench:
    """Methods as users get them: each a ``Runtime`` from ``edgespec.load`` with default load options (its own
    backend, context and threads, online adaptation as the default has it), requests sent back to back.
    ``settle`` waits for the background work a request left (its time is reported), so that no method's
    background work runs during another method's timed request."""

    def __init__(self, model: str, methods: list[Method], max_tokens: int):
        import edgespec

        self.max_tokens = max_tokens
        self.path = registry.resolve(model)
        self.runtimes = {m.name: edgespec.load(model, **user_options(m.name)) for m in methods}
        self.target = self.runtimes[methods[0].name].backend  # plain's: margins and the cost table
        self.n_threads = self.target.n_threads

    def run(self, m: Method, prompt: list[int]) -> Run:
        from edgespec.options import Request

        gen = self.runtimes[m.name].start(prompt, Request(max_tokens=self.max_tokens))
        for _ in gen:
            pass
        return Run(gen.tokens, gen.stats.tok_s, gen.stats.as_dict())

    def settle(self) -> float:
        from edgespec import background

        return background.timed_wait()

    def margin_at(self, prompt: list[int], plain: list[int], i: int) -> float:
        return top2_margin(self.target, prompt + plain[:i])

    def close(self) -> None:
        for rt in self.runtimes.values():
            rt.close()


def llama_generate(llm, prompt: list[int], eog: frozenset[int], max_tokens: int,
                   **sampling) -> tuple[list[int], float, float]:
    """llama-cpp-python's own ``Llama.generate`` loop (``sampling``: its keywords, e.g. ``grammar``): the tokens
    before EOS or ``max_tokens``, the seconds to the first token, and the seconds after it."""
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for tok in llm.generate(prompt, reset=True, **sampling):
        if t_first is None:
            t_first = time.perf_counter()
        if tok in eog:
            break
        out.append(tok)
        if len(out) >= max_tokens:
            break
    t_end = time.perf_counter()
    return out, (t_first or t_end) - t0, t_end - (t_first or t0)


def top2_margin(backend, tokens: list[int], mask=None) -> float:
    """The gap between the two largest logits after ``tokens`` (a prefill from an empty cache, left empty);
    ``mask``: a function of the logits row that sets what may not come next to -inf (a grammar's), inf when it
    leaves one token only."""
    backend.truncate(0)
    logits = backend.prefill(tokens).logits[-1]
    backend.truncate(0)
    if mask is not None:
        logits = mask(logits)
    top = np.sort(logits[np.isfinite(logits)])[-2:]
    return float(top[1] - top[0]) if len(top) == 2 else float("inf")


def summarize(results: dict[str, list[Run]], base: str = "plain") -> dict[str, dict]:
    out = {}
    base_tps = np.array([r.tok_s for r in results[base]])
    for name, runs in results.items():
        tps = np.array([r.tok_s for r in runs])
        answered = (tps > 0) & (base_tps > 0)  # an empty answer (EOS at once) has no speed to compare
        ratio = tps[answered] / base_tps[answered] if answered.any() else np.ones(1)
        s = {"tok_s_median": float(np.median(tps)), "tok_s_p25": float(np.percentile(tps, 25)),
             "tok_s_p75": float(np.percentile(tps, 75)), "speedup_median": float(np.median(ratio)),
             "speedup_p25": float(np.percentile(ratio, 25)), "speedup_p75": float(np.percentile(ratio, 75)),
             "speedup_min": float(ratio.min()), "speedup_max": float(ratio.max()),
             "tokens": int(sum(len(r.tokens) for r in runs)), "compared": int(answered.sum())}
        verifies = sum(r.stats.get("verifies", 0) for r in runs)
        if any(r.stats.get("drafted") for r in runs):
            accepted = sum(r.stats["accepted"] for r in runs)
            s["tokens_per_verify"] = (accepted + verifies) / verifies if verifies else 0.0
            s["draft_ms_per_verify"] = 1000 * sum(r.stats["draft_s"] for r in runs) / max(verifies, 1)
            depth = max(len(r.stats["drafted_per_depth"]) for r in runs)
            dr = np.zeros(depth)
            ac = np.zeros(depth)
            for r in runs:
                d = r.stats["drafted_per_depth"]
                dr[:len(d)] += d
                a = r.stats["accepted_per_depth"]
                ac[:len(a)] += a
            s["accept_per_depth"] = [float(a / d) if d else 0.0 for a, d in zip(ac, dr, strict=True)]
            s["draft_steps_share"] = float(dr[0] / verifies) if verifies else 0.0
        out[name] = s
    return out


def write_report(out_dir: Path, meta: dict, summary: dict, checks: dict, per_prompt: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "checks": checks, "per_prompt": per_prompt}, indent=1))
    lines = [f"Model `{meta['model']}`, prompts `{meta['prompts']}` (n={meta['n']}), {meta['max_tokens']} new tokens, "
             f"greedy, {meta['threads']} threads. Command: `{meta['command']}`", "",
             f"Machine: {meta['cpu']} ({meta['cores']} cores; {' '.join(meta['simd'])}; transparent huge pages "
             f"{meta.get('thp')}, {meta.get('huge_page_mib', 0)} MiB of the target in them). Verify cost c(n) in "
             f"single steps, measured in this run: {machine.cost_line(meta['verify_cost'])}. Acceptance per depth a "
             f"free drafter needs on this table to break even: {machine.break_even_line(meta['verify_cost'], 1.0)}; "
             f"for 1.15x: {machine.break_even_line(meta['verify_cost'], 1.15)} (- : not even at 100%).", "",
             "| method | tok/s median [p25-p75] | speedup vs plain: median [p25-p75] (min-max) | tokens/verify | "
             "acceptance per depth | greedy == plain |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        acc = ", ".join(f"{a:.2f}" for a in s.get("accept_per_depth", [])[:6]) or "-"
        tpv = f"{s['tokens_per_verify']:.2f}" if "tokens_per_verify" in s else "-"
        lines.append(f"| {name} | {s['tok_s_median']:.2f} [{s['tok_s_p25']:.2f}-{s['tok_s_p75']:.2f}] | "
                     f"{s['speedup_median']:.3f}x [{s['speedup_p25']:.3f}-{s['speedup_p75']:.3f}] "
                     f"({s['speedup_min']:.2f}-{s['speedup_max']:.2f}) | {tpv} | {acc} | {checks[name]['summary']} |")
    if meta.get("llama_bench"):
        lines += ["", f"llama.cpp C++ `llama-bench` (tg{meta['max_tokens']}, same threads, same run): "
                  f"{meta['llama_bench']}"]
    if meta.get("after_a_reply"):
        lines += ["", "The request sent right after each reply (`--follow`: the next prompt at once, the reply's "
                  "background work still due), speed relative to plain's request in the same place:", "",
                  "| method | tok/s median | speedup vs plain: median [p25-p75] |", "|---|---|---|"]
        lines += [f"| {n} | {s['tok_s_median']:.2f} | {s['speedup_median']:.3f}x [{s['speedup_p25']:.3f}-"
                  f"{s['speedup_p75']:.3f}] |" for n, s in meta["after_a_reply"].items()]
    if meta.get("background_wait_s"):
        lines += ["", "Background work waited for after each method's requests (seconds, all prompts): " +
                  ", ".join(f"{k} {v}" for k, v in meta["background_wait_s"].items())]
    lines += ["", f"Mode: {meta.get('mode', 'one shared target')}. Peak RSS of the bench process: "
              f"{meta['peak_rss_mb']:.0f} MB."]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out_dir / "speedup.png", meta, summary)


def _plot(path: Path, meta: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    med = [summary[n]["speedup_median"] for n in names]
    lo = [summary[n]["speedup_median"] - summary[n]["speedup_p25"] for n in names]
    hi = [summary[n]["speedup_p75"] - summary[n]["speedup_median"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.5))
    ax.barh(names, med, xerr=[lo, hi], color=["#888" if n == "plain" else "#3a7" for n in names], capsize=3)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup vs edgespec plain decoding (median, p25-p75)")
    ax.set_title(f"{meta['model']} · {meta['prompts']} n={meta['n']} · {meta['max_tokens']} tokens · greedy")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def llama_bench(binary: str, model_path: Path, threads: int, n: int) -> str:
    """Run llama.cpp's C++ llama-bench for plain decoding (tg) and return its tok/s as text."""
    r = subprocess.run([binary, "-m", str(model_path), "-t", str(threads), "-p", "0", "-n", str(n), "-o", "json"],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return f"llama-bench failed: {r.stderr.strip()[-200:]}"
    rows = json.loads(r.stdout)
    return ", ".join(f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f} tok/s" for row in rows)


def huge_page_mib(backend) -> int:
    """MiB of the target's buffers in huge pages (0: off, or not llama.cpp on Linux)."""
    collapsed = getattr(backend, "huge_pages", None)
    return collapsed.bytes >> 20 if collapsed is not None else 0


def main(args) -> int:
    methods = [parse_method(s.strip()) for s in args.methods.split(",") if s.strip()]
    if not methods or methods[0].kind != "plain":
        methods = [parse_method("plain")] + [m for m in methods if m.kind != "plain"]
    users = args.as_users
    bench = UserBench(args.model, methods, args.max_tokens) if users else \
        Bench(args.model, methods, args.n_ctx, args.threads, args.max_tokens)
    threads = bench.n_threads
    meta = {"model": args.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
            "threads": threads, "command": "edgespec " + " ".join(sys.argv[1:]),
            "mode": "as users get them (default load options, back to back)" if users else "one shared target",
            **machine.describe(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "verify_cost": machine.cost_table(bench.target), "huge_page_mib": huge_page_mib(bench.target)}
    if args.llama_bench:
        meta["llama_bench"] = llama_bench(args.llama_bench, bench.path, threads, args.max_tokens)
    prompts = load_prompts(args.prompts, args.n, bench.target)
    results: dict[str, list[Run]] = {m.name: [] for m in methods}
    after: dict[str, list[Run]] = {m.name: [] for m in methods}  # --follow: the request right after a reply
    waits: dict[str, list[float]] = {m.name: [] for m in methods}
    follow = users and args.follow
    rng = random.Random(0)
    with tqdm(total=len(prompts) * len(methods), desc="bench", unit="run") as bar:
        for i, prompt in enumerate(prompts):
            order = methods[:]
            rng.shuffle(order)
            for m in order:
                results[m.name].append(bench.run(m, prompt))
                if follow:  # the next prompt at once, while this reply's background work is due
                    after[m.name].append(bench.run(m, prompts[(i + 1) % len(prompts)]))
                if users:
                    waits[m.name].append(bench.settle())
                bar.set_postfix_str(f"{m.name}: {results[m.name][-1].tok_s:.1f} tok/s")
                bar.update()
    checks = check_outputs(bench, prompts, results)
    meta["peak_rss_mb"] = peak_rss_bytes() / 2**20
    if users:
        meta["background_wait_s"] = {k: round(float(sum(v)), 2) for k, v in waits.items()}
    if args.llama_bench:
        meta["llama_bench"] += " (before) / " + llama_bench(args.llama_bench, bench.path, threads,
                                                            args.max_tokens) + " (after)"
    bench.close()
    summary = summarize(results)
    keys = ("tokens_per_verify", "ttft_s", "finish_reason")
    per_prompt = {name: [{"tok_s": r.tok_s, "n": len(r.tokens), **{k: r.stats.get(k) for k in keys},
                          "tokens": [int(t) for t in r.tokens]} for r in runs]  # the output, for replays
                  for name, runs in results.items()}
    if follow:
        meta["after_a_reply"] = summarize(after)
    out_dir = Path(args.out)
    write_report(out_dir, meta, summary, checks, per_prompt)
    print((out_dir / "results.md").read_text())
    print(f"wrote {out_dir}/results.json, results.md, speedup.png", file=sys.stderr)
    bad = [n for n, c in checks.items() if c["mismatches"]]
    if bad:
        print(f"\n!!! GREEDY OUTPUT MISMATCH vs plain decoding for: {', '.join(bad)} !!!\n", file=sys.stderr)
        return 1
    return 0


def check_outputs(bench: Bench, prompts, results) -> dict[str, dict]:
    plain = results["plain"]
    checks = {}
    for name, runs in results.items():
        same, ties, bad = 0, [], []
        for i, r in enumerate(runs):
            if r.tokens == plain[i].tokens:
                same += 1
                continue
            j = common_prefix(r.tokens, plain[i].tokens)
            # the certified margin: plain decoding's top-two gap where the outputs part (a length difference
            # included: there plain decoding chose to stop, or spec did); only a near-tie may part
            margin = bench.margin_at(prompts[i], plain[i].tokens, j)
            (ties if margin < NEAR_TIE else bad).append({"prompt": i, "token": j, "margin": round(margin, 3)})
        if bad:
            print(f"!!! {name}: greedy output differs from plain decoding where it must not: {bad}", file=sys.stderr)
        text = f"{same}/{len(runs)}" + (f", {len(ties)} near-tie" if ties else "")
        text += f", {len(bad)} MISMATCH" if bad else ""
        checks[name] = {"identical": same, "near_ties": ties, "mismatches": bad, "summary": text}
    return checks



