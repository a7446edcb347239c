"""Analytic memory footprint of a run: weights, KV cache, compute and verify buffers, drafter, overhead.

Everything is read from the GGUF header (no weights are loaded), so a plan can be made before a
model is opened. The terms are resident bytes (RSS), each measured on this machine (llama-cpp-python
0.3.36, CPU, no mmap, flash attention; smollm2-135m, qwen2.5-coder-0.5b and -1.5b; RSS from
/proc/self/statm after loading, after a prefill of 1100 tokens and after ten 4-node verifies):
* weights: the tensor bytes (loaded without mmap, so llama.cpp's repacked copies replace originals);
* KV: n_ctx x layers x KV heads x (key + value head dims) x bytes per element (llama.cpp zeroes the
  whole buffer at start, so all of it is resident);
* vocab tables: llama.cpp's token strings, scores and merge ranks, measured by loading each model with
  ``vocab_only`` (16.1 MiB for 49152 tokens, 46.1 MiB for 151936);
* context: what a llama.cpp context holds besides its buffers (8.6 - 11.5 MiB measured);
* compute buffer: llama.cpp reserves ~300 MiB, but only the activations of the largest batch evaluated
  so far become resident: per batch token 13 bytes per FFN unit and 17 per embedding unit (fit within
  1% on all three models at batches 32, 128 and 512). A prompt longer than n_batch touches all of it;
* verify buffers: per tree node, its logits row in llama.cpp and as a Python copy and one temporary,
  and its hidden-state rows (``node_bytes``);
* runtime overhead: interpreter, numpy, jinja2 and the llama.cpp libraries before a model is loaded.
Predicted against measured RSS after a full-batch prefill: within 0.7% for each model alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
MiB = 1 << 20
RUNTIME_OVERHEAD = 48 * MiB  # python + numpy + llama.cpp libraries: measured RSS before loading a model
# fastapi, uvicorn, pydantic and the server's modules on top of it (measured: +23.3 MiB RSS on import, Xeon,
# Python 3.12); ``edgespec plan --serve`` counts it, a load counts what its process already holds
SERVER_OVERHEAD = 24 * MiB
VOCAB_BYTES_PER_TOKEN = 306  # llama.cpp vocab tables: 306 bytes per token + VOCAB_BASE (vocab_only loads)
VOCAB_BASE = int(1.75 * MiB)
CONTEXT_BYTES = 10 * MiB  # a llama.cpp context's own structures and the compute buffer's fixed part
COMPUTE_PER_FF, COMPUTE_PER_EMBD = 13, 17  # resident compute buffer per batch token, per FFN/embedding unit


@dataclass(frozen=True)
class ModelShape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    n_vocab: int
    weight_bytes: int
    n_ff: int  # feed-forward width (the largest activations of a batch)

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        if kv_type not in KV_BYTES:
            raise ValueError(f"kv_type must be one of {list(KV_BYTES)}, not {kv_type!r}")
        return int(self.n_layer * self.n_head_kv * (self.head_k + self.head_v) * KV_BYTES[kv_type])


def read_shape(path: str | Path) -> ModelShape:
    """Model dimensions and weight bytes from a GGUF header (``gguf_header``: the header alone is read, once
    per file and process). A file that is not a model edgespec can size is a ``ValueError``."""
    from edgespec.gguf_header import Array, read_header

    h = read_header(path)
    fields = h.fields

    def val(key: str, default=None):
        v = fields.get(key, default)
        return list(v.values) if isinstance(v, Array) and v.values is not None else v

    try:
        arch = val("general.architecture")
        n_embd = int(val(f"{arch}.embedding_length"))
        n_head = int(val(f"{arch}.attention.head_count"))
        n_head_kv = val(f"{arch}.attention.head_count_kv", n_head)
        n_head_kv = int(max(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv)
        head_k = int(val(f"{arch}.attention.key_length", n_embd // n_head))
        head_v = int(val(f"{arch}.attention.value_length", n_embd // n_head))
        tokens = fields.get("tokenizer.ggml.tokens")
        n_vocab = tokens.length if isinstance(tokens, Array) else int(val(f"{arch}.vocab_size"))
        weights = sum(t.n_bytes for t in h.tensors)
        n_ff = val(f"{arch}.feed_forward_length", 4 * n_embd)
        n_ff = int(max(n_ff) if isinstance(n_ff, list) else n_ff)
        n_layer = int(val(f"{arch}.block_count"))
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"cannot read the model's shape from the GGUF header of {path}: {e}") from e
    return ModelShape(arch, n_layer, n_embd, n_head, n_head_kv, head_k, head_v, n_vocab, weights, n_ff)


@dataclass
class Footprint:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __add__(self, other: Footprint) -> Footprint:
        merged = dict(self.parts)
        for k, v in other.parts.items():
            merged[k] = merged.get(k, 0) + v
        return Footprint(merged)

    def group(self, prefix: str) -> int:
        """Bytes of the parts whose names start with ``prefix`` (e.g. ``draft_``: the drafter's parts)."""
        return sum(v for k, v in self.parts.items() if k.startswith(prefix))

    def table(self) -> str:
        """One row a part; the drafter's parts (``draft_*``) followed by their sum."""
        rows, keys = [], list(self.parts)
        for i, k in enumerate(keys):
            rows.append(f"  {k:<22} {self.parts[k] / MiB:9.1f} MiB")
            if k.startswith(DRAFT) and (i + 1 == len(keys) or not keys[i + 1].startswith(DRAFT)):
                rows.append(f"  {'  drafter, in all':<22} {self.group(DRAFT) / MiB:9.1f} MiB")
        return "\n".join(rows + [f"  {'total':<22} {self.total / MiB:9.1f} MiB"])


DRAFT = "draft_"  # prefix of the drafter's parts in a run's footprint


def llama_footprint(shape: ModelShape, n_ctx: int, kv_type: str = "f16", n_batch: int = 512,
                    tree_nodes: int = 1, prefix: str = "") -> Footprint:
    """Bytes a llama.cpp model needs for a context of ``n_ctx``, prefill batches of ``n_batch`` tokens and
    verify trees of ``tree_nodes`` (1: plain decoding, or a draft model's own chain steps)."""
    p = prefix
    return Footprint({
        f"{p}weights": shape.weight_bytes,
        f"{p}kv_cache": n_ctx * shape.kv_bytes_per_token(kv_type),
        f"{p}vocab_tables": VOCAB_BYTES_PER_TOKEN * shape.n_vocab + VOCAB_BASE,
        f"{p}compute_buffer": CONTEXT_BYTES + n_batch * (COMPUTE_PER_FF * shape.n_ff + COMPUTE_PER_EMBD * shape.n_embd),
        f"{p}verify_buffers": max(tree_nodes, 1) * node_bytes(shape),
    })


def node_bytes(shape: ModelShape) -> int:
    """Bytes one more verify-tree node costs: its logits row in llama.cpp's output buffer, the Python copy
    and one temporary, and its hidden-state rows."""
    return 3 * shape.n_vocab * 4 + 2 * shape.n_embd * 4


def run_footprint(target: ModelShape, n_ctx: int, kv_type: str = "f16", n_batch: int = 512,
                  tree_nodes: int = 1, drafter: int | dict[str, int] = 0,
                  overhead: int = RUNTIME_OVERHEAD) -> Footprint:
    """The whole process: the target, the drafter's declared parts (a draft model's weights and KV cache, a
    head, its adaptation: named ``draft_*``; an int is one ``draft_state`` part) and the runtime overhead
    (``overhead``: the process before the model loads: interpreter and libraries, a server's included)."""
    fp = llama_footprint(target, n_ctx, kv_type, n_batch, tree_nodes)
    parts = drafter if isinstance(drafter, dict) else ({"state": drafter} if drafter else {})
    for k, v in parts.items():
        fp.parts[k if k.startswith(DRAFT) else DRAFT + k] = int(v)
    fp.parts["runtime_overhead"] = overhead
    return fp
