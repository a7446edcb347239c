"""``edgespec convert``: a GGUF model to MLX weights."""

from __future__ import annotations

import argparse

from edgespec import registry


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a GGUF model to MLX weights (done automatically on first MLX use)")
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    p.add_argument("--bits", default="gguf", choices=["gguf", "4", "8", "none"],
                   help="gguf: keep llama.cpp's own quantized codes (default); 4/8: MLX re-quantization; none: f16")
    p.add_argument("--force", action="store_true", help="convert again even if a cached conversion exists")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from edgespec.backends.convert import convert

    bits = a.bits if a.bits in ("gguf", "none") else int(a.bits)
    print(convert(registry.resolve(a.model), bits=bits, force=a.force))
    return 0
