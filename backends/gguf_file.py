"""Reading GGUF files without loading them: header queries in a child process, tensor rows on demand.

``gguf.GGUFReader`` leaves most of the file resident while it parses (measured: +490 MiB RSS for the
491 MB qwen2.5-coder-0.5b file), which a memory budget cannot afford, so header queries run in a
short-lived child process. Tensor rows are then read with ``os.pread`` and dequantized one slice at a
time: unlike pages of a memory map, which stay in the process's RSS once touched (a drafter that reads
one embedding row per step would slowly map the whole table), read bytes live only in the page cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def in_child(func: str, *args: str):
    """Run ``module:function(*args)`` in a fresh interpreter and return its JSON-able result."""
    module, name = func.split(":")
    code = f"import json, sys; from {module} import {name} as f; print(json.dumps(f(*sys.argv[1:])))"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"cannot read the GGUF header of {args[0]}: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def _tensor_locations(path: str, *names: str) -> dict:
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


def tensor_rows(path: str | Path, *names: str) -> list[TensorRows]:
    """``TensorRows`` for several tensors of one file, with a single header read."""
    locs = in_child("edgespec.backends.gguf_file:_tensor_locations", str(path), *names)
    return [TensorRows(path, n, locs[n]) for n in names]


class TensorRows:
    """Rows of a 2-D GGUF tensor (e.g. ``token_embd.weight``: one row per token), dequantized on demand."""

    def __init__(self, path: str | Path, name: str, loc: dict | None = None):
        from gguf import GGMLQuantizationType

        loc = loc or in_child("edgespec.backends.gguf_file:_tensor_locations", str(path), name)[name]
        self.qtype = GGMLQuantizationType(loc["type"])
        self.n_cols, self.n_rows = loc["shape"]  # GGUF lists the fastest-varying dimension first
        self.row_bytes = loc["n_bytes"] // self.n_rows
        self.offset = loc["offset"]
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """The quantized bytes of ``rows``, [len(rows), row_bytes] (one read per run of consecutive rows)."""
        out = np.empty((len(rows), self.row_bytes), np.uint8)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            if rows[i] < 0 or rows[j - 1] >= self.n_rows:
                raise IndexError(f"rows {rows[i]}..{rows[j - 1]} out of range for {self.n_rows} rows")
            n = (j - i) * self.row_bytes
            buf = os.pread(self._fd, n, self.offset + int(rows[i]) * self.row_bytes)
            if len(buf) != n:
                raise ValueError(f"short read: the GGUF file ends inside row {rows[i]}")
            out[i:j] = np.frombuffer(buf, np.uint8).reshape(j - i, self.row_bytes)
            i = j
        return out

    def __call__(self, rows, chunk: int = 2048) -> np.ndarray:
        """float32 rows ``rows`` (any int sequence), [len(rows), n_cols]."""
        from gguf.quants import dequantize

        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.n_cols), np.float32)
        for i in range(0, len(rows), chunk):
            raw = self.raw(rows[i:i + chunk])
            out[i:i + chunk] = dequantize(raw, self.qtype).reshape(-1, self.n_cols)
        return out
