"""Footprint model against real peak RSS, and the planner's choices and refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgespec.drafters import NGRAM_BYTES
from edgespec.memory.footprint import read_shape, run_footprint
from edgespec.memory.planner import BudgetError, parse_size, plan

# Peak RSS from VmHWM: ru_maxrss is inherited across fork+exec on Linux, so a child of a big pytest
# process would report the parent's peak.
MEASURE = """
import json, sys
from edgespec.backends.llama_cpp import LlamaCppBackend
from edgespec.runtime import Runtime
path, n_ctx, n_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = Runtime(LlamaCppBackend(path, n_ctx=n_ctx, n_threads=2, n_batch=n_batch), "m")
rt.generate("def quicksort(arr):\\n" * 30, max_tokens=24)
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(json.dumps(hwm[0]))
"""


@pytest.mark.parametrize("which,n_ctx,n_batch", [("smol", 2048, 512), ("qwen", 4096, 128)])
def test_footprint_within_15_percent_of_peak_rss(which, n_ctx, n_batch, smol_path, qwen_path):
    path = smol_path if which == "smol" else qwen_path
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(n_ctx), str(n_batch)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout.strip().splitlines()[-1])
    predicted = run_footprint(read_shape(path), n_ctx, "f16", n_batch, 1).total
    assert abs(predicted - peak) / peak < 0.15, (predicted / 2**20, peak / 2**20)


def test_shape_read_from_header(qwen_path):
    s = read_shape(qwen_path)
    assert (s.arch, s.n_layer, s.n_embd, s.n_head_kv, s.n_vocab) == ("qwen2", 24, 896, 2, 151936)
    assert s.kv_bytes_per_token("f16") == 24 * 2 * (64 + 64) * 2
    assert s.kv_bytes_per_token("q4_0") < s.kv_bytes_per_token("q8_0") < s.kv_bytes_per_token("f16")


def test_header_reader_agrees_with_the_gguf_package(smol_path):
    """edgespec's lean header reader against ``gguf.GGUFReader``: every key's value (an array's item type and
    length, and its values where kept), the tensor table and where the tensor data starts."""
    from gguf import GGUFReader, GGUFValueType

    from edgespec.gguf_header import Array, read_header

    ref, h = GGUFReader(smol_path), read_header(smol_path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's own version and count entries
    assert list(h.fields) == keys
    for k in keys:
        f, v = ref.fields[k], h.fields[k]
        if f.types[0] == GGUFValueType.ARRAY:
            assert isinstance(v, Array) and v.length == len(f.data), k
            assert len(f.types) == 1 or v.type == f.types[1], k
            assert v.values is None or list(v.values) == f.contents(), k
        else:
            assert v == f.contents(), k
    assert h.data_offset == ref.data_offset
    assert [(t.name, t.type, list(t.shape), t.offset, t.n_bytes) for t in h.tensors] == \
        [(t.name, int(t.tensor_type), [int(x) for x in t.shape], int(t.data_offset), int(t.n_bytes))
         for t in ref.tensors]
    assert read_shape(smol_path).weight_bytes == sum(int(t.n_bytes) for t in ref.tensors)


def test_header_reader_bounds_hostile_headers(tmp_path):
    """A header that claims more than the file holds (a string, more entries than its bytes could hold), a string
    too long to hold or a tensor of too many dimensions is refused before it is read."""
    import struct

    from edgespec.gguf_header import MAX_DIMS, MAX_STRING, problem

    def gguf(name: str, body: bytes, size: int) -> Path:
        f = tmp_path / f"{name}.gguf"
        f.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
        with open(f, "r+b") as fh:
            fh.truncate(size)  # sparse: nothing is written past the header
        return f

    def key(length: int) -> bytes:  # no tensor, one key of the claimed length
        return struct.pack("<QQQ", 0, 1, length) + b"k" * 8

    assert "past the end" in problem(gguf("long", key(1 << 20), 4096))
    assert f"at most {MAX_STRING}" in problem(gguf("huge", key(MAX_STRING + 1), MAX_STRING + 4096))
    assert "absurd counts" in problem(gguf("many", struct.pack("<QQ", 4096 // 24 + 1, 0), 4096))  # 24 B each
    dims = struct.pack("<QQQ", 1, 0, 1) + b"t" + struct.pack("<I", MAX_DIMS + 1)
    assert f"{MAX_DIMS + 1} dimensions" in problem(gguf("dims", dims, 4096))


def test_planner_degrades_then_refuses(qwen_path):
    shape = read_shape(qwen_path)
    roomy = plan(shape, parse_size("2GB"), draft="ngram", draft_bytes=NGRAM_BYTES)
    assert roomy.draft == "ngram" and roomy.n_ctx == 4096 and roomy.kv_type == "f16"
    assert roomy.footprint.total <= parse_size("2GB")
    tight = plan(shape, roomy.plain_min + (roomy.spec_min - roomy.plain_min) // 2 + 1, draft="ngram",
                 draft_bytes=NGRAM_BYTES)
    assert tight.n_ctx < 4096 or tight.kv_type != "f16"
    assert tight.footprint.total <= tight.budget
    with pytest.raises(BudgetError, match="at least"):
        plan(shape, roomy.plain_min - 1, draft="ngram", draft_bytes=NGRAM_BYTES)
    mid = plan(shape, (roomy.budget + roomy.spec_min) // 2, draft="ngram", draft_bytes=NGRAM_BYTES)
    assert mid.footprint.total <= mid.budget and mid.draft == "ngram"


@pytest.mark.parametrize("text,value", [("1.5GB", 1.5 * 2**30), ("800MB", 800 * 2**20), ("2GiB", 2 * 2**30),
                                        ("1024", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == int(value)


def test_parse_size_rejects_junk():
    with pytest.raises(ValueError):
        parse_size("lots")
