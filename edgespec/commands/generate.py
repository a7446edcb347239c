"""``edgespec generate``: one answer (or a raw completion) to a prompt given as arguments or on stdin."""

from __future__ import annotations

import argparse
import json
import sys

from edgespec.commands import common


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="one-shot generation (prompt as arguments or on stdin)")
    common.add_model_args(p)
    common.add_gen_args(p)
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.add_argument("--stats-json", action="store_true", help="print the stats as JSON on stderr")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="answer with a JSON object (JSON mode)")
    fmt.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against the JSON schema in FILE")
    fmt.add_argument("--regex", metavar="PATTERN", help="answer with text matching the regular expression")
    fmt.add_argument("--grammar", metavar="FILE", help="answer in the grammar in FILE (Lark, or llama.cpp's GBNF)")
    p.add_argument("prompt", nargs="*")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    prompt = " ".join(a.prompt) if a.prompt and a.prompt != ["-"] else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass it as an argument or on stdin")
    checked, req = common.load_options(a), common.request(a, response_format=response_format(a))
    with common.open_runtime(checked) as rt:  # closing stops a running adaptation after its step and saves it
        if a.raw:
            gen = rt.stream(prompt, req)
        else:
            msgs = [{"role": "system", "content": a.system}] if a.system else []
            msgs.append({"role": "user", "content": prompt})
            gen = rt.chat(msgs, req, stream=True)
        common.print_stream(gen, a.stats_json)
    return 0


def response_format(a: argparse.Namespace) -> dict | None:
    """The ``Request.response_format`` that ``--json``, ``--json-schema``, ``--regex`` or ``--grammar`` ask for."""
    if a.json:
        return {"type": "json_object"}
    if a.json_schema:
        try:
            schema = json.loads(_read(a.json_schema, "--json-schema"))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {a.json_schema}: not valid JSON: {e}") from None
        return {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    if a.regex:
        return {"type": "regex", "pattern": a.regex}
    if a.grammar:
        return {"type": "grammar", "grammar": _read(a.grammar, "--grammar")}
    return None


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror}") from None
