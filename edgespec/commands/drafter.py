"""``edgespec drafter reset``: forget what the drafter learned from the user's traffic."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgespec import paths, registry
from edgespec.drafters import HISTORY_DIR


def add_parser(sub) -> None:
    p = sub.add_parser("drafter", help="manage the online-adapted drafter state and the draft history")
    p.add_argument("action", choices=["reset"], help="reset: forget what the drafter learned from your traffic")
    p.add_argument("--target", default=None, help="model id (default: all)")
    p.add_argument("--draft-history", default=None, metavar="PATH",
                   help=f"also remove this draft history file (always removed: those in "
                        f"{paths.cache_dir() / HISTORY_DIR})")
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
    folder = paths.cache_dir() / HISTORY_DIR
    histories = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if getattr(a, "draft_history", None):
        histories.append(Path(a.draft_history).expanduser())
    for p in histories:
        if p.exists():
            p.unlink()
            print(f"removed the draft history {p}")
        else:
            print(f"no draft history at {p}")
    return 0
