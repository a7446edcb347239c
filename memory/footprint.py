"""Analytic memory footprint of a run: weights, KV cache, compute and verify buffers, drafter, overhead.

Everything is read from the GGUF header (no weights are loaded), so a plan can be made before a
model is opened. The terms are resident bytes (RSS), calibrated on this machine against peak RSS:
* weights: the tensor bytes (loaded without mmap, so llama.cpp's repacked copies replace originals);
* KV: n_ctx x layers x KV heads x (key + value head dims) x bytes per element (llama.cpp zeroes the
  whole buffer at start, so all of it is resident);
* vocab tables: llama.cpp's token strings, scores and merge ranks, about 430 bytes per token;
* compute buffer: reserved for n_batch x n_vocab logits, but only what a decode touches becomes
  resident; measured, peak RSS did not change between n_batch 128 and 512;
* verify buffers: the logits and hidden rows of a verified tree, in llama.cpp and as Python copies;
* runtime overhead: interpreter, numpy and the llama.cpp libraries before a model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
MiB = 1 << 20
RUNTIME_OVERHEAD = 48 * MiB  # python + numpy + llama.cpp libraries: measured RSS before loading a model
VOCAB_BYTES_PER_TOKEN = 430  # llama.cpp vocab tables (fit on smollm2-135m and qwen2.5-coder-0.5b)
COMPUTE_TOUCHED = 12 * MiB  # resident part of the compute buffer during prefill and decode


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

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        if kv_type not in KV_BYTES:
            raise ValueError(f"kv_type must be one of {list(KV_BYTES)}, not {kv_type!r}")
        return int(self.n_layer * self.n_head_kv * (self.head_k + self.head_v) * KV_BYTES[kv_type])


def read_shape(path: str | Path) -> ModelShape:
    """Model dimensions and weight bytes from a GGUF header, read in a child process (see gguf_file)."""
    from edgespec.backends.gguf_file import in_child

    return ModelShape(**in_child("edgespec.memory.footprint:_read_shape_dict", str(path)))


def _read_shape_dict(path: str) -> dict:
    import dataclasses

    return dataclasses.asdict(_read_shape(path))


def _read_shape(path: str) -> ModelShape:
    from gguf import GGUFReader

    r = GGUFReader(path)

    def val(key: str, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = val("general.architecture")
    n_embd = int(val(f"{arch}.embedding_length"))
    n_head = int(val(f"{arch}.attention.head_count"))
    n_head_kv = val(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = int(max(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv)
    head_k = int(val(f"{arch}.attention.key_length", n_embd // n_head))
    head_v = int(val(f"{arch}.attention.value_length", n_embd // n_head))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else int(val(f"{arch}.vocab_size"))
    weights = sum(int(t.n_bytes) for t in r.tensors)
    return ModelShape(arch, int(val(f"{arch}.block_count")), n_embd, n_head, n_head_kv, head_k, head_v,
                      n_vocab, weights)


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

    def table(self) -> str:
        rows = [f"  {k:<22} {v / MiB:9.1f} MiB" for k, v in self.parts.items()]
        return "\n".join(rows + [f"  {'total':<22} {self.total / MiB:9.1f} MiB"])


def llama_footprint(shape: ModelShape, n_ctx: int, kv_type: str = "f16", n_batch: int = 512,
                    tree_nodes: int = 1, n_seq_max: int = 8, prefix: str = "") -> Footprint:
    """Bytes a llama.cpp model needs for a context of ``n_ctx`` and verify trees of ``tree_nodes``."""
    logits_row = shape.n_vocab * 4
    p = prefix
    return Footprint({
        f"{p}weights": shape.weight_bytes,
        f"{p}kv_cache": n_ctx * shape.kv_bytes_per_token(kv_type),
        f"{p}vocab_tables": VOCAB_BYTES_PER_TOKEN * shape.n_vocab,
        f"{p}compute_buffer": COMPUTE_TOUCHED + min(n_batch, 64) * shape.n_embd * 4 * 8,
        f"{p}verify_buffers": (max(tree_nodes, n_seq_max) + 2 * tree_nodes) * logits_row
        + 2 * tree_nodes * shape.n_embd * 4,
    })


def node_bytes(shape: ModelShape) -> int:
    """Bytes one more verify-tree node costs: its logits row in llama.cpp's output buffer, the Python copy
    and one temporary, and its hidden-state rows."""
    return 3 * shape.n_vocab * 4 + 2 * shape.n_embd * 4


def run_footprint(target: ModelShape, n_ctx: int, kv_type: str = "f16", n_batch: int = 512,
                  tree_nodes: int = 1, drafter_bytes: int = 0, draft: ModelShape | None = None) -> Footprint:
    """The whole process: target, optional draft model, drafter state and runtime overhead."""
    fp = llama_footprint(target, n_ctx, kv_type, n_batch, tree_nodes)
    if draft is not None:
        fp = fp + llama_footprint(draft, n_ctx, kv_type, n_batch, 1, prefix="draft_")
    fp.parts["drafter"] = drafter_bytes
    fp.parts["runtime_overhead"] = RUNTIME_OVERHEAD
    return fp
