"""``edgespec generate``: one answer (or a raw completion) to a prompt given as arguments or on stdin."""

from __future__ import annotations

import argparse
import sys

from edgespec.commands import common


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="one-shot generation (prompt as arguments or on stdin)")
    common.add_model_args(p)
    common.add_gen_args(p)
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print the stats as JSON on stderr")
    p.add_argument("prompt", nargs="*")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    prompt = " ".join(a.prompt) if a.prompt and a.prompt != ["-"] else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass it as an argument or on stdin")
    checked, req = common.load_options(a), common.request(a)
    with common.open_runtime(checked) as rt:  # closing stops a running adaptation after its step and saves it
        if a.raw:
            gen = rt.stream(prompt, req)
        else:
            msgs = [{"role": "system", "content": a.system}] if a.system else []
            msgs.append({"role": "user", "content": prompt})
            gen = rt.chat(msgs, req, stream=True)
        common.print_stream(gen, a.json)
    return 0
