"""Tensor rows of a GGUF file on demand, without loading it (header queries: ``edgespec.gguf_header``).

Rows are read with ``os.pread`` and dequantized one slice at a time: unlike pages of a memory map, which stay in the
process's RSS once touched (a drafter that reads one embedding row per step would slowly map the whole table), read
bytes live only in the page cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgespec.gguf_header import tensor_locations


def tensor_rows(path: str | Path, *names: str) -> list[TensorRows]:
    """``TensorRows`` for several tensors of one file, with a single header read."""
    locs = tensor_locations(str(path), *names)
    return [TensorRows(path, n, locs[n]) for n in names]


class TensorRows:
    """Rows of a 2-D GGUF tensor (e.g. ``token_embd.weight``: one row per token), dequantized on demand."""

    def __init__(self, path: str | Path, name: str, loc: dict | None = None):
        from gguf import GGMLQuantizationType

        loc = loc or tensor_locations(str(path), name)[name]
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


class GgufFile:
    """A model's file as far as a drafter reads it (``Backend.path`` and ``Backend.tensor_rows``), for offline
    tools that replay or train without loading the model."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def tensor_rows(self, *names: str) -> list[TensorRows]:
        return tensor_rows(self.path, *names)
