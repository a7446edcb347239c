"""The ``edgespec`` command: parses the arguments and dispatches to a command module (``edgespec.commands``)."""

from __future__ import annotations

import argparse
import sys

from edgespec import __version__, registry
from edgespec.backends.base import BackendError
from edgespec.commands import bench, chat, convert, drafter, generate, infill, models, plan, serve, train_drafter
from edgespec.generate import PromptTooLongError

COMMANDS = (models, generate, infill, bench, convert, plan, train_drafter, drafter, chat, serve)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgespec", description="Local LLMs with lossless speculative decoding.")
    ap.add_argument("--version", action="version", version=f"edgespec {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and any(bench.is_server_flag(x) for x in argv[1:]):  # it parses its own options
        run = lambda: bench.run_server(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        run = lambda: args.func(args) or 0
    try:
        return run()
    except (registry.ModelError, PromptTooLongError, BackendError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
