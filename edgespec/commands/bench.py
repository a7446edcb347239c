"""``edgespec bench``: decoding methods side by side on the same prompts (speed, as users, memory budgets,
online adaptation; ``--server``: the server bench, which parses its own options)."""

from __future__ import annotations

import argparse
import sys

from edgespec import registry
from edgespec.benches.prompts import SETS as PROMPT_SETS

METHODS_DEFAULT = "plain,llama-python,anchor-2,anchor-10,ngram"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark decoding methods side by side on the same prompts")
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    p.add_argument("--prompts", default="humaneval", choices=list(PROMPT_SETS))
    p.add_argument("--n", type=int, default=20, help="number of prompts (default 20)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--methods", default=METHODS_DEFAULT,
                   help="comma-separated: plain, llama-python, anchor-K, ngram[@D[xW]], redrafter[@D[xW]], auto, "
                        "model:<id>[@D]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench for the C++ baseline")
    p.add_argument("--as-users", action="store_true",
                   help="load each method as a user gets it (edgespec.load with default options, adaptation "
                        "included, a backend each) and send the requests back to back; methods: plain, auto, "
                        "auto-noadapt, ngram, redrafter (+exact); background work is waited for between methods")
    p.add_argument("--follow", action="store_true",
                   help="with --as-users: after each reply send the next prompt at once and report its speed")
    p.add_argument("--out", default="bench_out/latest")
    p.add_argument("--memory-budgets", default=None,
                   help="memory-limit benchmark instead: comma-separated budgets (e.g. 1GB,1.5GB,plain+10%%), "
                        "each run in a fresh process that records its peak RSS")
    p.add_argument("--draft", default="auto", help="drafter for --memory-budgets runs (default: auto)")
    p.add_argument("--online", type=int, default=0,
                   help="online-adaptation benchmark instead: stream this many HumanEval prompts with and without "
                        "adapting the ReDrafter head")
    p.add_argument("--online-depth", type=int, default=4,
                   help="fixed draft depth of the --online runs, so that tokens/verify measures the drafter itself "
                        "(0: the cost-aware controller)")
    p.add_argument("--chat-tokens", type=int, default=64, help="tokens per turn of the 10-turn chat (--memory-budgets)")
    p.add_argument("--constrained", action="store_true",
                   help="structured-output benchmark instead (edgespec/benches/structured_tasks.py): edgespec's "
                        "constrained plain decoding, its default constrained path and llama-cpp-python's grammar "
                        "generation, interleaved; uses --model, --n (tasks, 0: all 23), --max-tokens, --threads, "
                        "--n-ctx, --draft, --out, and --methods among plain,default,llama-python")
    p.add_argument("--constrained-seeds", type=int, default=3,
                   help="sampled runs per task besides the greedy one (--constrained; default 3)")
    p.add_argument("--exact", action="store_true",
                   help="--constrained: load the runtime in exact mode (verify batches that stay bit-identical to "
                        "plain decoding), where greedy answers must equal constrained plain decoding's")
    p.add_argument("--server", action="store_true",
                   help="server benchmark instead (edgespec serve against the in-process API): every other option "
                        "goes to it; `edgespec bench --server --help` lists them")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.constrained:
        from edgespec.benches.structured import main as structured_main

        if a.methods == METHODS_DEFAULT:
            a.methods = ""
        return structured_main(a)
    if a.online:
        from edgespec.benches.online import main as online_main

        return online_main(a)
    if a.memory_budgets:
        from edgespec.benches.memory import main as memory_main

        return memory_main(a)
    from edgespec.benches.speed import main as speed_main

    return speed_main(a)


def run_server(argv: list[str]) -> int:
    """``edgespec bench --server ...``: the server bench, with every other option of the command its own."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"edgespec bench --server needs {', '.join(missing)}: pip install 'edgespec[dev]'", file=sys.stderr)
        return 2
    from edgespec.benches.server import main as server_main

    return server_main([x for x in argv if not is_server_flag(x)], prog="edgespec bench --server")


def is_server_flag(arg: str) -> bool:
    """``--server`` or an abbreviation argparse would take for it (no other bench option starts with ``--s``)."""
    return len(arg) > 2 and "--server".startswith(arg)
