"""``edgespec plan``: the memory plan for a budget, printed without loading the model."""

from __future__ import annotations

import argparse

from edgespec import registry


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan context, KV type and drafting for a memory budget")
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    p.add_argument("--memory-budget", required=True, help="e.g. 1.5GB or 800MB")
    p.add_argument("--n-ctx", type=int, default=4096, help="wanted context (default 4096)")
    p.add_argument("--min-ctx", type=int, default=512, help="smallest acceptable context (default 512)")
    p.add_argument("--draft", default="auto", help="drafter to plan for (as for chat), or 'none'")
    p.add_argument("--backend", default="auto", choices=["auto", "llama.cpp", "mlx"],
                   help="backend to plan for (MLX holds an f16 KV cache only)")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=False,
                   help="count online adaptation of the ReDrafter head from the start, as loading with --adapt "
                        "does (default: only what is resident; adaptation that starts later, once the head pays, "
                        "starts only where the headroom takes it)")
    p.add_argument("--serve", action="store_true",
                   help="plan for `edgespec serve`: count the server's own libraries too (what a server loaded with "
                        "--memory-budget counts)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from edgespec import drafters
    from edgespec.build import plan_for
    from edgespec.memory.footprint import RUNTIME_OVERHEAD, SERVER_OVERHEAD
    from edgespec.memory.planner import parse_size

    spec = drafters.parse(a.draft, a.model)
    adapt = a.adapt is True and spec.head is not None and drafters.trainer_available()  # "auto": counted once it starts
    p = plan_for(registry.resolve(a.model), parse_size(a.memory_budget), a.n_ctx, a.min_ctx, spec, adapt, a.backend,
                 overhead=RUNTIME_OVERHEAD + (SERVER_OVERHEAD if a.serve else 0))
    print(p.describe())
    return 0
