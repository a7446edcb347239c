"""``edgespec bench --online N``: does online adaptation raise acceptance on the user's own traffic?

The first N HumanEval prompts stream through one runtime twice, with the ReDrafter head adapting
between prompts and without. Adaptation runs synchronously between prompts here (in the product it runs
in a background thread between requests), so its time is not counted in either run's decoding speed.
Drafts have a fixed depth (``--online-depth``, default 4: the beam length the head was trained for) and
width 1, so that tokens per verify measures the drafter itself; under the cost-aware controller most
steps on this CPU are plain decoding and the figure would say little about the drafter.
Reported: mean accepted tokens per verify over the first and the last 40 prompts of each run, and a
PNG of acceptance over time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm


def run_stream(target, drafter, prompts, max_tokens: int, adapt: bool, costs: dict, depth: int | None,
               model: str = "") -> list[dict]:
    """Stream ``prompts`` through a ``Runtime`` (the product path) over ``target`` with ``drafter``; adapt
    synchronously after each prompt when ``adapt``."""
    from edgespec.models.drafting.online import OnlineAdapter, OnlineConfig
    from edgespec.options import Request
    from edgespec.runtime import Runtime

    drafter.adapter = OnlineAdapter(drafter, OnlineConfig(enabled=adapt))
    rt = Runtime(target, model, drafter, width=1, fixed_depth=depth)
    rt.controller.verify_s.update(costs)
    rows = []
    for prompt in tqdm(prompts, desc=f"online adapt={'on' if adapt else 'off'}", unit="prompt"):
        target.truncate(0)
        before = drafter.adapter.updates
        gen = rt.start(prompt, Request(max_tokens=max_tokens))
        gen.text()
        if drafter.adapter.pending():
            drafter.adapter.adapt()  # here, in this thread: the bench measures what adaptation learns
        steps = drafter.adapter.updates - before
        st = gen.stats
        rows.append({"tokens_per_verify": st.tokens_per_verify, "tok_s": st.tok_s, "adapt_steps": steps})
    return rows


def main(args) -> int:
    from edgespec import registry
    from edgespec.backends.llama_cpp import LlamaCppBackend
    from edgespec.benches.prompts import load_prompts
    from edgespec.controller import calibrate
    from edgespec.drafters import redrafter_weights
    from edgespec.models.drafting.redrafter import ReDrafter

    path = registry.resolve(args.model)
    weights = redrafter_weights(args.model)
    if weights is None:
        raise registry.ModelError(f"no ReDrafter weights for {args.model}")
    target = LlamaCppBackend(path, n_ctx=args.n_ctx, n_threads=args.threads)
    prompts = load_prompts("humaneval", args.online, target)
    costs = calibrate(target)
    target.truncate(0)
    res = {}
    for adapt in (True, False):
        drafter = ReDrafter(weights, target)  # fresh shipped weights for each run
        res["on" if adapt else "off"] = run_stream(target, drafter, prompts, args.max_tokens, adapt, costs,
                                                   args.online_depth or None, args.model)
    w = min(40, len(prompts) // 2)
    summary = {}
    for k, rows in res.items():
        tpv = [r["tokens_per_verify"] for r in rows]
        summary[k] = {"first": float(np.mean(tpv[:w])), "last": float(np.mean(tpv[-w:])),
                      "updates": sum(1 for r in rows if r["adapt_steps"])}
        summary[k]["gain"] = summary[k]["last"] - summary[k]["first"]
    summary["adaptation_effect"] = summary["on"]["gain"] - summary["off"]["gain"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "prompts": len(prompts), "window": w, "max_tokens": args.max_tokens,
            "depth": args.online_depth or "controller"}
    (out / "online.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": res}, indent=1))
    _plot(out / "online.png", meta, res)
    lines = [f"Online adaptation, `{args.model}`, {len(prompts)} HumanEval prompts x {args.max_tokens} tokens, "
             f"draft depth {meta['depth']}, window {w}:", "",
             "| run | tokens/verify first | last | change | updates |", "|---|---|---|---|---|"]
    for k in ("on", "off"):
        s = summary[k]
        lines.append(f"| adaptation {k} | {s['first']:.3f} | {s['last']:.3f} | {s['gain']:+.3f} | {s['updates']} |")
    lines.append(f"\nAdaptation effect (change on - change off): {summary['adaptation_effect']:+.3f} tokens/verify")
    (out / "online.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    target.close()
    return 0


def _plot(path: Path, meta: dict, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for k, rows in res.items():
        y = np.array([r["tokens_per_verify"] for r in rows])
        win = max(1, min(10, len(y)))
        (raw,) = ax.plot(y, alpha=0.25)
        ax.plot(np.arange(win - 1, len(y)), np.convolve(y, np.ones(win) / win, "valid"), color=raw.get_color(),
                label=f"adaptation {k} (moving mean of {win})")
    ax.set_xlabel("prompt")
    ax.set_ylabel("tokens per verify")
    ax.set_title(f"{meta['model']}: online adaptation on HumanEval traffic")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
