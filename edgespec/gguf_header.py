"""GGUF header queries in a short-lived child process, shared by the registry, memory and the backends.

``gguf.GGUFReader`` leaves most of the file resident while it parses (measured: +490 MiB RSS for the 491 MB
qwen2.5-coder-0.5b file), which a memory budget cannot afford, so every header query runs in a fresh
interpreter and returns JSON. This module imports nothing else of edgespec: memory, backends and the core
may all use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def in_child(func: str, *args: str):
    """Run ``module:function(*args)`` in a fresh interpreter and return its JSON-able result."""
    module, name = func.split(":")
    code = f"import json, sys; from {module} import {name} as f; print(json.dumps(f(*sys.argv[1:])))"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"cannot read the GGUF header of {args[0]}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def tensor_locations(path: str, *names: str) -> dict:
    """Offset, type, shape and size of the named tensors (``output.weight`` falls back to the tied input table)."""
    from gguf import GGUFReader

    wanted = set(names) | ({"token_embd.weight"} if "output.weight" in names else set())
    out = {t.name: {"offset": int(t.data_offset), "type": int(t.tensor_type), "shape": [int(x) for x in t.shape],
                    "n_bytes": int(t.n_bytes)} for t in GGUFReader(path).tensors if t.name in wanted}
    if "output.weight" in names and "output.weight" not in out and "token_embd.weight" in out:
        out["output.weight"] = out["token_embd.weight"]  # tied embeddings: the output head is the input table
    missing = set(names) - set(out)
    if missing:
        raise KeyError(f"no tensor {sorted(missing)} in {path}")
    return out


def problem(path: str) -> str | None:
    """What is structurally wrong with a GGUF file (a broken header, tensors past its end), or None."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError on broken headers
        return f"is a corrupt or truncated GGUF file: {e}"
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        return f"is truncated: tensors need {end} bytes but the file has {size}."
    return None
