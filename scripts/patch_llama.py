"""Apply edgespec's source fixes to an extracted llama-cpp-python sdist (idempotent).

One fix, needed only by builds with AMX (``EDGESPEC_AMX=1``, ``scripts/llama_cmake_args.py``):
``ggml_tile_config_init`` (ggml-cpu/amx/mmq.cpp) fills its tile configuration on the stack, and gcc drops the
stores to it before ``_tile_loadconfig``, so every tile is configured empty and the first batch of 2+ rows dies
with SIGILL at ``tilezero`` (the same as upstream PR ggml-org/llama.cpp#26954). A compiler barrier keeps the
stores. The code it touches is compiled only with AMX on: other builds are unchanged.

    python scripts/patch_llama.py path/to/llama_cpp_python-0.3.36
"""

import sys
from pathlib import Path

MMQ = "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
OLD = "    _tile_loadconfig(&tc);\n    done = true;"
NEW = ('    asm volatile("" : : "r"(&tc) : "memory");  // edgespec: keep the stores to tc (gcc drops them)\n'
       + OLD)


def patch(src: Path) -> str:
    path = src / MMQ
    text = path.read_text()
    if NEW in text:
        return "already patched"
    if text.count(OLD) != 1:
        raise SystemExit(f"{path}: the AMX tile-config code is not where edgespec expects it (another llama.cpp?)")
    path.write_text(text.replace(OLD, NEW))
    return "patched"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/patch_llama.py <extracted llama-cpp-python sdist>")
    print(f"{sys.argv[1]}: {patch(Path(sys.argv[1]))}", file=sys.stderr)
