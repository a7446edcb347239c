"""The backend protocol: what the core, the drafters and the memory planner may ask of a model.

A backend owns one model and its KV cache. It knows nothing about sampling, drafting or chat state.
The cache holds ``cached`` (committed tokens); ``forward`` appends a token tree on top of it, and
``commit`` keeps one root-to-node path of that tree and drops the rest.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class BackendError(RuntimeError):
    """The backend could not do what was asked (decode failure, context full, bad input)."""


class ContextFullError(BackendError):
    """The KV cache has no room for the requested tokens."""


class PrefillCancelled(BackendError):
    """``prefill`` stopped between batches because its ``cancel`` check said so (the cache keeps what was
    evaluated)."""


@dataclass
class KVState:
    """A snapshot of the committed cache: its tokens and the backend's own bytes for them."""

    tokens: list[int]
    data: object  # backend-specific (llama.cpp: the sequence's state bytes; MLX: key/value arrays)
    nbytes: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    bos: int | None
    eog: frozenset[int]  # end-of-generation tokens (EOS, EOT, <|im_end|>, ...)
    add_bos: bool
    chat_template: str | None
    bos_text: str = ""
    eos_text: str = ""


@dataclass
class ForwardOut:
    """Outputs of one decode: a row per evaluated node (or per requested position)."""

    logits: np.ndarray  # [n, n_vocab] float32
    hidden: np.ndarray | None  # [n, n_embd] float32, post-final-norm (the LM head's input)


@dataclass
class MemoryInfo:
    weights_bytes: int
    kv_bytes_per_token: int
    n_ctx: int
    n_cached: int
    extra: dict = field(default_factory=dict)

    @property
    def kv_used_bytes(self) -> int:
        return self.kv_bytes_per_token * self.n_cached

    @property
    def kv_reserved_bytes(self) -> int:
        return self.kv_bytes_per_token * self.n_ctx


class Backend(Protocol):
    name: str  # the backend's kind: "llama.cpp" or "mlx"
    path: str  # the GGUF file the model was loaded from
    info: ModelInfo
    n_ctx: int
    cached: list[int]  # tokens committed to the cache, in order
    # The largest verify batch whose rows equal single-token decoding bit for bit (None: no known limit).
    # The controller keeps trees within it so that greedy speculation equals plain decoding exactly.
    exact_rows: int | None
    # ... and the context length below which that holds (None: any): every row of a verify must sit below it.
    exact_context: int | None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (e.g. ``tokenizer.ggml.fim_pre_token_id``), or None."""
        ...

    def tensor_rows(self, *names: str) -> list:
        """``gguf_file.TensorRows`` of the model's 2-D tensors ``names`` (e.g. its embedding table), read on demand
        from the file, never kept resident (drafters read the target's embeddings through this)."""

    def prefill(self, tokens: list[int], want_hidden: bool = False,
                cancel: Callable[[], bool] | None = None) -> ForwardOut:
        """Append ``tokens`` to the cache (committed); return the last position's outputs ([1, ...]).

        ``hidden`` may be None unless ``want_hidden`` is set (it can cost an extra decode). ``cancel`` is
        checked between batches; when it returns True, ``PrefillCancelled`` is raised.
        """
        ...

    def forward(self, tokens: list[int], parents: list[int], want_hidden: bool = True) -> ForwardOut:
        """Evaluate a tree on top of the cache. ``parents[i]`` < i, or -1 for a child of the cache end.

        Node i sits at position ``len(cached) + depth(i)``. Returns outputs for every node (``hidden`` may be
        None unless ``want_hidden``). The nodes stay pending until ``commit``.
        """
        ...

    def commit(self, path: list[int]) -> None:
        """Keep the nodes ``path`` (a root-to-node chain of the last forward) and drop all others."""
        ...

    def truncate(self, n: int) -> None:
        """Roll the cache back to its first ``n`` tokens."""
        ...

    def save_state(self) -> KVState:
        """Snapshot the committed cache (no pending tree may be open)."""
        ...

    def load_state(self, state: KVState) -> None:
        """Replace the cache by a snapshot taken by ``save_state`` of this backend."""
        ...

    def memory(self) -> MemoryInfo: ...

    def close(self) -> None: ...


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: ``taskset``, a cpuset; all cores where the platform has no
    affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def detokenize(backend: Backend, tokens: list[int]) -> str:
    return b"".join(backend.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental detokenizer: bytes of tokens in, complete UTF-8 text out.

    A character split across tokens is held back until its last byte arrives.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self.backend.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tree_depths(parents: list[int]) -> list[int]:
    depths: list[int] = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise BackendError(f"parents[{i}] = {p}: a parent must come before its child (or be -1)")
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def check_path(path: list[int], parents: list[int]) -> None:
    """A committed path must start at a root and follow parent links."""
    for k, node in enumerate(path):
        want = -1 if k == 0 else path[k - 1]
        if not 0 <= node < len(parents) or parents[node] != want:
            raise BackendError(f"commit path {path} does not follow the tree's parent links {parents}")
