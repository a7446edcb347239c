"""What the commands that load a model share: the model and generation options, parsed once into one
``LoadOptions`` and one ``Request``."""

from __future__ import annotations

import argparse
import json
import sys

from edgespec import build, registry
from edgespec.build import Checked, check
from edgespec.generate import Stats
from edgespec.options import LoadOptions, Request
from edgespec.runtime import Runtime


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL,
                   help=f"registry id or path to a .gguf file (default: {registry.DEFAULT_MODEL})")
    p.add_argument("--backend", default="auto", choices=["auto", "llama.cpp", "mlx"])
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores the process may use, at most 8)")
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"])
    p.add_argument("--draft", default="auto",
                   help="speculative drafter: auto (suffix drafting, the model's ReDrafter head while it pays, a "
                        "request's prediction: per step whichever pays most), suffix (from what the model has seen "
                        "and said, in this request and earlier ones), ngram (this request only), "
                        "redrafter[:<weights.npz>], model:<id> (same-vocabulary draft model), xvocab:<id> (draft "
                        "model with another vocabulary), none (default: auto)")
    p.add_argument("--draft-history", default=None, metavar="PATH",
                   help="keep the suffix drafter's index of earlier prompts and outputs in this file across runs "
                        "(default: in memory while the model is loaded; `edgespec drafter reset` clears it)")
    p.add_argument("--draft-depth", type=int, default=None, help="fixed draft depth (default: cost-aware controller)")
    p.add_argument("--draft-width", type=int, default=None, help="candidates per draft node / beams")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt the ReDrafter head online to your own traffic, between replies, saved per user "
                        "(--adapt: from the first reply; default: once the head has shown that it pays on this "
                        "machine, where torch is installed, the `train` extra; `edgespec drafter reset` forgets it)")
    p.add_argument("--exact", action="store_true",
                   help="verify only batches whose logits are bit-identical to plain decoding (greedy output "
                        "identical to --draft none, at some cost in speed)")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the weights and KV cache in transparent huge pages on Linux: faster decoding, ~1-3 s "
                        "more to load (default: on unless EDGESPEC_HUGE_PAGES=0)")
    p.add_argument("--memory-budget", default=None,
                   help="run within this much RAM (e.g. 1.5GB): context, KV type, batch and drafter are planned "
                        "to fit, and the draft tree is capped to the live headroom; refused if too small")


def add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=Request.max_tokens,
                   help=f"tokens to generate at most (default {Request.max_tokens})")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")


def load_options(a: argparse.Namespace) -> Checked:
    """The arguments' ``LoadOptions``, made and checked once (model reference, drafter spec) before anything
    loads."""
    options = LoadOptions(n_ctx=a.n_ctx, n_threads=a.threads, kv_type=a.kv_type, backend=a.backend, draft=a.draft,
                          draft_depth=a.draft_depth, draft_width=a.draft_width, memory_budget=a.memory_budget,
                          adapt="auto" if a.adapt is None else a.adapt, exact=a.exact, huge_pages=a.huge_pages,
                          draft_history=getattr(a, "draft_history", None))
    return check(a.model, options)


def request(a: argparse.Namespace, **extra) -> Request:
    """The arguments' ``Request``, made and checked once (``extra``: options the command adds, e.g. ``cancel``)."""
    return Request(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                   stop=tuple(a.stop), **extra)


def open_runtime(checked: Checked) -> Runtime:
    """Load what ``load_options`` checked and print the load's notices."""
    rt = build.open_runtime(checked)
    for line in rt.notices:
        print(f"edgespec: {line}", file=sys.stderr)
    return rt


def print_stream(gen, as_json: bool = False) -> None:
    """Write a generation's text to stdout as it comes, then its stats to stderr (one line, or JSON)."""
    for chunk in gen:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if as_json:
        print(json.dumps(gen.stats.as_dict()), file=sys.stderr)
    else:
        print_stats(gen.stats)


def print_stats(stats: Stats) -> None:
    print(f"[{stats.line()}]", file=sys.stderr, flush=True)
