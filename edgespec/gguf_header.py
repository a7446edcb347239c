"""GGUF header queries, shared by the registry, memory and the backends: metadata and the tensor table of a
model file, read without loading it.

A lean reader of the header alone, through a small buffer, in the calling process: scalars and strings are
kept, numeric arrays when short (per-layer values), other arrays only as their type and length; a vocabulary's
strings are stepped over, not decoded. ``gguf.GGUFReader`` builds numpy views of every vocabulary entry and
leaves much of the file resident while it parses (measured: +490 MiB RSS for the 491 MB qwen2.5-coder-0.5b
file), so it used to run in a child process per query: 8.4 s a query on qwen2.5-coder-0.5b's 152k-token
vocabulary and 2.6 s on smollm2-135m's 49k (child start included; measured on a 2-core Xeon), paid up to five
times per file by a budgeted load of a file path (the reference check, the plan, the live guard). This reader
takes 91 and 29 ms there, holds about one 64 KiB chunk besides what it returns, and parses a file's header once
per process (cached by path, size, modification time and inode).

This module imports nothing else of edgespec: memory, backends and the core may all use it.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
CHUNK = 64 << 10  # bytes read at a time: under glibc's mmap threshold, a short-lived heap block
SHORT_ARRAY = 4096  # numeric arrays up to this many items keep their values (per-layer hyperparameters)
MAX_STRING = 16 << 20  # a key or string value longer than this is refused (a chat template is a few KiB)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS: llama.cpp refuses a tensor with more
# the fewest bytes a key (length, type, a 4-byte value) and a tensor's entry (name length, dims, type, offset) take:
# a header claiming more entries than its file could hold is refused before any is read
MIN_KEY_BYTES, MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8

STRING, ARRAY = 8, 9  # GGUF value types that are not scalars
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # struct codes


@lru_cache(maxsize=1)
def blocks() -> dict[int, tuple[int, int]]:
    """ggml tensor type -> (elements per block, bytes per block), the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


@dataclass(frozen=True)
class Array:
    """A metadata array: its items' GGUF value type, its length, and its values when numeric and short."""

    type: int
    length: int
    values: tuple | None


@dataclass(frozen=True)
class Tensor:
    name: str
    type: int  # ggml type
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    version: int
    fields: MappingProxyType  # key -> int | float | bool | str | Array
    tensors: tuple[Tensor, ...]
    data_offset: int
    file_size: int


def read_header(path) -> Header:
    """The header of the GGUF file at ``path`` (a ``ValueError`` naming the file if it cannot be read)."""
    try:
        st = os.stat(path)
        return _cached(os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the GGUF header of {path}: {e}") from e


@lru_cache(maxsize=16)
def _cached(path: str, size: int, mtime_ns: int, inode: int) -> Header:
    with open(path, "rb") as f:
        return _parse(_Reader(f, size))


class _Reader:
    """Sequential reads through a small buffer; a read past the end of the file is a ``ValueError``."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.pos, self.start = b"", 0, 0  # start: the file offset of buf[0]
        self.order = "<"
        self._structs: dict[str, struct.Struct] = {}

    def tell(self) -> int:
        return self.start + self.pos

    def _within(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise ValueError(f"the header runs past the end of the file (to byte {self.tell() + n} of {self.size})")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self._within(n)
            rest = self.buf[self.pos:]
            self.start += self.pos
            self.buf, self.pos = rest + self.f.read(max(n - len(rest), CHUNK)), 0
            if len(self.buf) < n:
                raise ValueError("the file ended while its header was read")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        self._within(n)
        end = self.tell() + n
        self.f.seek(end)
        self.buf, self.pos, self.start = b"", 0, end

    def unpack(self, fmt: str) -> tuple:
        s = self._structs.get(fmt)
        if s is None:
            s = self._structs[fmt] = struct.Struct(self.order + fmt)
        return s.unpack(self.take(s.size))

    def string(self) -> bytes:
        n = self.unpack("Q")[0]
        if n > MAX_STRING:  # a hostile file must not make the reader hold it whole
            raise ValueError(f"a string of {n} bytes in the header (at most {MAX_STRING})")
        return self.take(n)

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` strings (a vocabulary): length prefixes read in place, chunk by chunk."""
        length = struct.Struct(self.order + "Q").unpack_from
        left = count
        while left:
            buf, pos, end = self.buf, self.pos, len(self.buf)
            while left and pos + 8 <= end:
                nxt = pos + 8 + length(buf, pos)[0]
                if nxt > end:
                    break
                pos = nxt
                left -= 1
            self.pos = pos
            if left:  # a string across the end of the buffer: through the refilling reads
                self.skip(self.unpack("Q")[0])
                left -= 1

    def value(self, vtype: int, key: str):
        if vtype == STRING:
            return self.string().decode("utf-8", errors="replace")
        code = SCALAR.get(vtype)
        if code is not None:
            return self.unpack(code)[0]
        if vtype == ARRAY:
            itype, count = self.unpack("IQ")
            return Array(itype, count, self.array(itype, count, key))
        raise ValueError(f"unknown value type {vtype} of {key!r}")

    def array(self, itype: int, count: int, key: str) -> tuple | None:
        if count > self.size - self.tell():  # every item takes a byte at least
            raise ValueError(f"{key!r} claims {count} items, more than the file holds")
        code = SCALAR.get(itype)
        if code is not None:
            n = struct.calcsize("<" + code) * count
            if count <= SHORT_ARRAY:
                return struct.unpack(f"{self.order}{count}{code}", self.take(n))
            self.skip(n)
        elif itype == STRING:
            self.skip_strings(count)
        elif itype == ARRAY:
            for _ in range(count):
                sub, n = self.unpack("IQ")
                self.array(sub, n, key)
        else:
            raise ValueError(f"unknown item type {itype} of {key!r}")
        return None


def _parse(r: _Reader) -> Header:
    if r.take(4) != b"GGUF":
        raise ValueError("GGUF magic invalid")
    raw = r.take(4)
    version = int.from_bytes(raw, "little")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        r.order, version = ">", int.from_bytes(raw, "big")
    if version not in VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported")
    n_tensors, n_kv = r.unpack("QQ")
    if n_tensors * MIN_TENSOR_BYTES + n_kv * MIN_KEY_BYTES > r.size:
        raise ValueError(f"absurd counts: {n_tensors} tensors and {n_kv} keys in a file of {r.size} bytes")
    fields: dict = {}
    for _ in range(n_kv):
        key = r.string().decode("utf-8")
        if key in fields:
            raise ValueError(f"duplicate key {key!r}")
        fields[key] = r.value(r.unpack("I")[0], key)
    infos = []
    for _ in range(n_tensors):
        name = r.string().decode("utf-8")
        n_dims = r.unpack("I")[0]
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = struct.unpack(f"{r.order}{n_dims}Q", r.take(8 * n_dims))
        ggml_type, offset = r.unpack("IQ")
        if ggml_type not in blocks():
            raise ValueError(f"tensor {name!r} has an unknown type {ggml_type}")
        infos.append((name, ggml_type, dims, offset))
    if len({name for name, *_ in infos}) != len(infos):
        raise ValueError("duplicate tensor names")
    align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"invalid alignment {align!r}: must be a power of two")
    data_offset = r.tell() + (-r.tell()) % align
    tensors = []
    for name, ggml_type, dims, offset in infos:
        block, size = blocks()[ggml_type]
        tensors.append(Tensor(name, ggml_type, dims, data_offset + offset, math.prod(dims) * size // block))
    return Header(version, MappingProxyType(fields), tuple(tensors), data_offset, r.size)


def tensor_locations(path: str, *names: str) -> dict:
    """Offset, type, shape and size of the named tensors (``output.weight`` falls back to the tied input table)."""
    wanted = set(names) | ({"token_embd.weight"} if "output.weight" in names else set())
    out = {t.name: {"offset": t.offset, "type": t.type, "shape": list(t.shape), "n_bytes": t.n_bytes}
           for t in read_header(path).tensors if t.name in wanted}
    if "output.weight" in names and "output.weight" not in out and "token_embd.weight" in out:
        out["output.weight"] = out["token_embd.weight"]  # tied embeddings: the output head is the input table
    missing = set(names) - set(out)
    if missing:
        raise ValueError(f"no tensor {sorted(missing)} in {path}")
    return out


def problem(path: str) -> str | None:
    """What is structurally wrong with a GGUF file (a broken header, tensors past its end), or None."""
    try:
        header = read_header(path)
    except Exception as e:
        return f"is a corrupt or truncated GGUF file: {e.__cause__ or e}"
    end = max((t.offset + t.n_bytes for t in header.tensors), default=0)
    if end > header.file_size:
        return f"is truncated: tensors need {end} bytes but the file has {header.file_size}."
    return None
