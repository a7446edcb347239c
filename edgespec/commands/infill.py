"""``edgespec infill``: fill in the middle of code, given the text before and after the cursor (two files, or a
file and a cursor position), with other files as repository context."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgespec.commands import common


def add_parser(sub) -> None:
    p = sub.add_parser("infill", help="fill in the middle of code at a cursor (a model with FIM tokens)")
    common.add_model_args(p)
    common.add_gen_args(p)
    p.add_argument("--prefix-file", type=Path, help="the text before the cursor")
    p.add_argument("--suffix-file", type=Path, help="the text after the cursor (default: none)")
    p.add_argument("--file", type=Path, help="the file being edited (with --cursor)")
    p.add_argument("--cursor", help="LINE:COL in --file, both from 1 (COL past the line's end: at its end)")
    p.add_argument("--extra", type=Path, action="append", default=[],
                   help="another file of the repository, given as context (repeatable)")
    p.add_argument("--filename", default=None, help="the current file's path in the prompt (default: --file's)")
    p.add_argument("--n-indent", type=int, default=0,
                   help="after the first line, stop at a line indented less than this (default 0: off)")
    p.add_argument("--t-max-predict-ms", type=float, default=0,
                   help="after this long generating, stop at the next newline (default 0: no limit)")
    p.add_argument("--stats-json", action="store_true", help="print the stats as JSON on stderr")
    p.set_defaults(func=run)


def split_at(text: str, cursor: str) -> tuple[str, str]:
    """``text`` split at ``LINE:COL`` (both from 1)."""
    try:
        line, col = (int(x) for x in cursor.split(":"))
    except ValueError as e:
        raise ValueError(f"--cursor must be LINE:COL, not {cursor!r}") from e
    lines = text.splitlines(keepends=True) or [""]
    if not 1 <= line <= len(lines) or col < 1:
        raise ValueError(f"--cursor {cursor}: the file has {len(lines)} lines, and lines and columns count from 1")
    at = sum(map(len, lines[:line - 1])) + min(col - 1, len(lines[line - 1].rstrip("\r\n")))
    return text[:at], text[at:]


def inputs(a: argparse.Namespace) -> tuple[str, str, str | None]:
    """(prefix, suffix, current filename) from the arguments."""
    if a.file is not None:
        if a.cursor is None or a.prefix_file is not None or a.suffix_file is not None:
            raise ValueError("give --file with --cursor, or --prefix-file [--suffix-file]")
        prefix, suffix = split_at(a.file.read_text(), a.cursor)
        return prefix, suffix, a.filename or str(a.file)
    if a.prefix_file is None:
        raise ValueError("give --prefix-file [--suffix-file], or --file with --cursor")
    suffix = a.suffix_file.read_text() if a.suffix_file is not None else ""
    return a.prefix_file.read_text(), suffix, a.filename


def run(a: argparse.Namespace) -> int:
    prefix, suffix, filename = inputs(a)
    extra = [{"filename": str(p), "text": p.read_text()} for p in a.extra]
    checked = common.load_options(a)
    req = common.request(a, n_indent=a.n_indent, t_max_predict_ms=a.t_max_predict_ms)
    with common.open_runtime(checked) as rt:
        gen = rt.infill(prefix, suffix, extra, req, stream=True, filename=filename)
        common.print_stream(gen, a.stats_json)
    return 0
