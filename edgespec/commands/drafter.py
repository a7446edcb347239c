"""``edgespec drafter reset``: forget what the drafter learned from the user's traffic."""

from __future__ import annotations

import argparse

from edgespec import paths, registry


def add_parser(sub) -> None:
    p = sub.add_parser("drafter", help="manage the online-adapted drafter state")
    p.add_argument("action", choices=["reset"], help="reset: forget what the drafter learned from your traffic")
    p.add_argument("--target", default=None, help="model id (default: all)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from edgespec.models.drafting.online import state_path

    targets = [a.target] if a.target else list(registry.MODELS)
    for t in targets:
        p = state_path(paths.cache_dir(), registry.model_key(t))
        if p.exists():
            p.unlink()
            print(f"removed the adapted drafter state for {t} ({p})")
        else:
            print(f"no adapted drafter state for {t}")
    return 0
