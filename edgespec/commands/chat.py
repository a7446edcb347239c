"""``edgespec chat``: the interactive multi-turn chat (a REPL over one ``ChatSession``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from edgespec.commands import common
from edgespec.generate import PromptTooLongError


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat")
    common.add_model_args(p)
    common.add_gen_args(p)
    p.set_defaults(func=run)


HELP = "/reset clears the conversation, /stats shows statistics, /exit quits (Ctrl-C stops a reply)"


def run(a: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    checked = common.load_options(a)
    common.request(a)  # bad generation options fail before the model loads
    with common.open_runtime(checked) as rt:  # closing saves the adapted drafter state
        return repl(a, rt)


def repl(a: argparse.Namespace, rt) -> int:
    sess = rt.session(system=a.system)
    info = rt.backend.info
    print(f"edgespec chat: {info.name} on {rt.backend.name}, context {rt.backend.n_ctx}, drafter "
          f"{rt.drafter.name if rt.drafter else 'none'}. {HELP}", file=sys.stderr)
    if rt.plan is not None:
        print(rt.plan.describe(), file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(type /exit or press Ctrl-D to quit)", file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            sess.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd == "/stats":
            _show_session_stats(rt, sess)
            continue
        if cmd.startswith("/") and cmd.split()[0] in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        stop = threading.Event()
        old = signal.signal(signal.SIGINT, lambda *_, ev=stop: ev.set())
        try:
            dropped_before = sess.dropped
            for chunk in sess.send(line, common.request(a, cancel=stop)):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except PromptTooLongError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, old)
        print()
        if sess.dropped > dropped_before:
            print(f"(context full: dropped the {sess.dropped - dropped_before} oldest message(s))", file=sys.stderr)
        if sess.last_stats:
            if sess.last_stats.finish_reason == "context":
                print("(reply cut: the context is full; /reset to start over)", file=sys.stderr)
            common.print_stats(sess.last_stats)


def _show_session_stats(rt, sess) -> None:
    mem = rt.memory()
    turns = sess.turns
    gen = sum(s.generated_tokens for s in turns)
    dec = sum(s.decode_s for s in turns)
    print(f"turns: {len(turns)}, messages: {len(sess.messages)}, dropped: {sess.dropped}", file=sys.stderr)
    print(f"generated: {gen} tokens, {gen / dec if dec else 0:.1f} tok/s overall", file=sys.stderr)
    print(f"KV cache: {mem.n_cached}/{mem.n_ctx} tokens, {mem.kv_used_bytes / 2**20:.1f} MiB used of "
          f"{mem.kv_reserved_bytes / 2**20:.1f} MiB; weights {mem.weights_bytes / 2**20:.0f} MiB", file=sys.stderr)
    live = rt.memory_stats()
    line = f"memory: RSS {live['rss'] / 2**20:.0f} MiB, peak {live['peak_rss'] / 2**20:.0f} MiB"
    if "budget" in live:
        line += (f" of a {live['budget'] / 2**20:.0f} MiB budget (headroom {live['headroom'] / 2**20:.0f} MiB; "
                 f"trees capped {live['tree_shrinks']}x, drafting skipped {live['draft_stops']}x)")
    print(line + f"; drafter {live['drafter'] / 2**20:.1f} MiB", file=sys.stderr)
    if sess.last_stats:
        print(f"last reply: {sess.last_stats.line()}", file=sys.stderr)
