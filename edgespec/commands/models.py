"""``edgespec models``: list, pull, locate or remove models."""

from __future__ import annotations

import argparse

from edgespec import registry


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list, pull or locate models")
    p.add_argument("action", choices=["list", "pull", "path", "rm"])
    p.add_argument("id", nargs="?")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.action == "list":
        for r in registry.listing():
            mark = "pulled" if r["pulled"] else "-"
            print(f"{r['id']:<22} {r['size_mb']:>6} MB  {mark:<7} {r['description']}")
        return 0
    if not a.id:
        raise ValueError(f"`edgespec models {a.action}` needs a model id")
    if a.action == "pull":
        path = registry.pull(a.id)
        print(path)
    elif a.action == "path":
        print(registry.resolve(a.id, download=False))
    elif a.action == "rm":
        registry.remove(a.id)
    return 0
