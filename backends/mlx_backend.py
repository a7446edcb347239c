"""MLX backend: the GGUF's weights converted for mlx-lm's model classes, run on MLX's default device.

On Apple Silicon that is Metal; with ``mlx[cpu]`` (Linux) it is the CPU. No device is chosen here.

- Weights: converted once by ``edgespec.backends.convert`` (by default llama.cpp's own quantization
  codes, transcribed into MLX's affine format).
- Tokens: llama.cpp's own tokenizer from a vocab-only load of the same GGUF, so ids match the
  llama.cpp backend exactly.
- Cache: one mlx-lm ``KVCache`` per layer (also for gemma3's sliding-window layers, whose window is
  applied by the mask: a ``RotatingKVCache`` cannot roll back). A token tree is evaluated in one call:
  its nodes take the cache slots after the committed prefix in node order, each node sees the whole
  prefix, its ancestors and itself (an explicit additive mask), and is rotated at position
  ``len(cached) + depth``. ``commit`` gathers the kept nodes' K/V rows into consecutive slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as lc
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from edgespec.backends import convert
from edgespec.backends.base import (
    BackendError,
    ContextFullError,
    ForwardOut,
    KVState,
    MemoryInfo,
    ModelInfo,
    PrefillCancelled,
    check_path,
    tree_depths,
)
from edgespec.backends.llama_cpp import LoadError, init_once, meta_str, token_piece, tokenize

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class GgufVocab:
    """llama.cpp's tokenizer and metadata from a vocab-only load (no weights are read)."""

    def __init__(self, path: str | Path):
        init_once()
        self.path = str(path)
        mparams = lc.llama_model_default_params()
        mparams.vocab_only = True
        self._model = lc.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise LoadError(f"llama.cpp could not read the vocabulary of {self.path}")
        self._vocab = lc.llama_model_get_vocab(self._model)

    def meta(self, key: str) -> str | None:
        return meta_str(self._model, key)

    def info(self, cfg: dict) -> ModelInfo:
        """Vocabulary facts from llama.cpp; shapes from the mlx-lm config (a vocab-only load has none)."""
        v = self._vocab
        n_vocab = lc.llama_vocab_n_tokens(v)
        bos, eos = lc.llama_vocab_bos(v), lc.llama_vocab_eos(v)
        tmpl = lc.llama_model_chat_template(self._model, None)
        return ModelInfo(
            name=self.meta("general.name") or Path(self.path).stem,
            arch=self.meta("general.architecture") or "unknown",
            n_layer=cfg["num_hidden_layers"],
            n_embd=cfg["hidden_size"],
            n_head=cfg["num_attention_heads"],
            n_head_kv=cfg["num_key_value_heads"],
            n_vocab=n_vocab,
            n_ctx_train=cfg["max_position_embeddings"],
            bos=bos if bos >= 0 else None,
            eog=frozenset(t for t in range(n_vocab) if lc.llama_vocab_is_eog(v, t)),
            add_bos=bool(lc.llama_vocab_get_add_bos(v)),
            chat_template=tmpl.decode("utf-8") if tmpl else None,
            bos_text=self.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_text=self.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
        )

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return tokenize(self._vocab, text, add_special, parse_special)

    def piece(self, token: int, special: bool = False) -> bytes:
        return token_piece(self._vocab, token, special)

    def close(self) -> None:
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)
            self._model = None


@dataclass
class TreeState:
    """The tree being evaluated, shared by the rope wrappers and the caches; empty for a chain."""

    depths: np.ndarray | None = None  # [n] int
    visible: np.ndarray | None = None  # [n, n] bool: node i sees node j (ancestor or self)
    positions: mx.array | None = None  # [n] int32, absolute rope positions
    dtype: mx.Dtype = mx.float32
    _masks: dict = field(default_factory=dict)

    def set(self, parents: list[int], start: int, dtype: mx.Dtype) -> None:
        n = len(parents)
        depths = np.array(tree_depths(parents), dtype=np.int64)
        visible = np.eye(n, dtype=bool)
        for i, p in enumerate(parents):
            if p >= 0:
                visible[i] |= visible[p]
        self.depths, self.visible, self.dtype = depths, visible, dtype
        self.positions = mx.array(start + depths, dtype=mx.int32)
        self._masks = {}

    def clear(self) -> None:
        self.depths = self.visible = self.positions = None
        self._masks = {}

    def mask(self, start: int, window: int | None) -> mx.array:
        """Additive mask [n, start + n]: 0 where a node may attend, -inf elsewhere."""
        key = (start, window)
        if key not in self._masks:
            n = len(self.depths)
            vis = np.concatenate([np.ones((n, start), dtype=bool), self.visible], axis=1)
            if window is not None:
                qpos = start + self.depths
                kpos = np.concatenate([np.arange(start), start + self.depths])
                vis &= (qpos[:, None] - kpos[None, :]) < window
            add = np.where(vis, 0.0, -np.inf).astype(np.float32)
            self._masks[key] = mx.array(add).astype(self.dtype)
        return self._masks[key]


class TreeKVCache(KVCache):
    """mlx-lm's KVCache, whose mask is the tree's mask while a tree is evaluated."""

    def __init__(self, tree: TreeState):
        super().__init__()
        self.tree = tree

    def make_mask(self, n: int, **kwargs):
        if self.tree.depths is None:
            return super().make_mask(n, **kwargs)
        return self.tree.mask(self.offset, kwargs.get("window_size"))


class TreeRope(nn.Module):
    """Wraps a layer's rope: per-node positions while a tree is evaluated, else the cache offset."""

    def __init__(self, inner: nn.Module, tree: TreeState):
        super().__init__()
        self.inner = inner
        self.tree = tree

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        pos = self.tree.positions
        if pos is None:
            return self.inner(x, offset=offset)
        # [1, H, L, D] -> [L, H, 1, D]: each node becomes a batch row with its own offset
        return self.inner(x.transpose(2, 1, 0, 3), offset=pos).transpose(2, 1, 0, 3)


def default_dtype() -> str:
    """float32 on the CPU build (its float16 quantized matmul is ~30x slower), float16 on a GPU (Metal)."""
    return "float32" if mx.default_device() == mx.cpu else "float16"


class MlxBackend:
    """A GGUF model run by MLX through mlx-lm's model classes, with a tree-capable KV cache."""

    name = "mlx"
    exact_rows = None  # batched and single-token matmuls agree to rounding; near-ties may still part
    exact_context = None

    def __init__(self, path: str | Path, n_ctx: int = 4096, bits: int | str | None = "gguf", n_batch: int = 512,
                 memory_limit: int | None = None, dtype: str | None = None, progress: bool = True,
                 kv_type: str = "f16"):
        """Load (converting on first use) the GGUF at ``path``.

        ``bits``: weights mode, see ``convert.mode`` (``"gguf"``: llama.cpp's codes transcribed,
        4 / 8: MLX re-quantization, ``"none"``: float16). ``dtype``: activations and float weights
        (default float32 on the CPU, float16 on a GPU). ``memory_limit``: bytes, passed to
        ``mx.set_memory_limit`` (process-wide; the previous limit comes back on ``close``).
        """
        if n_ctx < 16:
            raise BackendError(f"n_ctx must be at least 16, not {n_ctx}")
        if kv_type != "f16":  # the planner knows this (memory.planner.BACKEND_KV) and never plans another
            raise BackendError(f"the MLX backend keeps its KV cache in the activation dtype; kv_type {kv_type!r} "
                               "is not supported (use f16 or the llama.cpp backend)")
        self.kv_type = kv_type
        dtype = dtype or default_dtype()
        if dtype not in DTYPES:
            raise BackendError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
        self._old_limit = mx.set_memory_limit(int(memory_limit)) if memory_limit else None
        self.path = str(path)
        self.memory_limit = memory_limit
        self._tok = GgufVocab(path)
        self.mlx_path = convert.convert(path, bits=bits, progress=progress)
        self.mode = convert.mode(bits)
        self.model, self.config = convert.load(self.mlx_path)
        self.info = self._tok.info(self.config)
        self.dtype = DTYPES[dtype]
        self.model.set_dtype(self.dtype)
        self._tree = TreeState()
        for layer in self.model.layers:
            layer.self_attn.rope = TreeRope(layer.self_attn.rope, self._tree)
        tied = "lm_head" not in self.model
        self._head = self.model.model.embed_tokens.as_linear if tied else self.model.lm_head
        mx.eval(self.model.parameters())
        self.n_ctx = min(n_ctx, self.info.n_ctx_train) if self.info.n_ctx_train > 0 else n_ctx
        self.n_batch = n_batch
        self._cache = [TreeKVCache(self._tree) for _ in self.model.layers]
        self.cached: list[int] = []
        self._pending: tuple[list[int], list[int]] | None = None
        self._piece_cache: dict[int, bytes] = {}
        self.n_prefilled = 0

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self._tok.tokenize(text, add_special, parse_special)

    def tensor_rows(self, *names: str) -> list:
        from edgespec.backends.gguf_file import tensor_rows

        return tensor_rows(self.path, *names)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token contributes to the text (control tokens contribute none)."""
        b = self._piece_cache.get(token)
        if b is None:
            b = self._piece_cache[token] = self._tok.piece(token)
        return b

    def meta(self, key: str) -> str | None:
        return self._tok.meta(key)

    # ---- memory ---------------------------------------------------------------------------------
    def memory(self) -> MemoryInfo:
        cfg = self.config
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        per_tok = self.info.n_layer * cfg["num_key_value_heads"] * 2 * head_dim * self.dtype.size
        weights = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        extra = {
            "active_bytes": mx.get_active_memory(),
            "peak_bytes": mx.get_peak_memory(),
            "cache_bytes": mx.get_cache_memory(),
            "kv_allocated_bytes": sum(c.nbytes for c in self._cache),
            "memory_limit": mx.get_memory_limit(),
            "device": str(mx.default_device()),
            "weights_mode": self.mode,
        }
        return MemoryInfo(weights_bytes=int(weights), kv_bytes_per_token=int(per_tok), n_ctx=self.n_ctx,
                          n_cached=len(self.cached), extra=extra)

    # ---- decoding -------------------------------------------------------------------------------
    def _run(self, tokens: list[int], last_only: bool = False) -> ForwardOut:
        self._check_open()
        hidden = self.model.model(mx.array([tokens], dtype=mx.int32), cache=self._cache)[0]
        if last_only:
            hidden = hidden[-1:]
        logits = self._head(hidden)[:, : self.info.n_vocab]
        state = [a for c in self._cache for a in (c.keys, c.values)]
        mx.eval(logits, hidden, *state)
        return ForwardOut(logits=np.array(logits.astype(mx.float32)),
                          hidden=np.array(hidden.astype(mx.float32)))

    def _room(self, n: int) -> None:
        if len(self.cached) + n > self.n_ctx:
            raise ContextFullError(f"context full: {len(self.cached)} cached + {n} new > n_ctx={self.n_ctx}")

    def _set_offset(self, n: int) -> None:
        for c in self._cache:
            c.offset = n

    def prefill(self, tokens: list[int], want_hidden: bool = False, cancel=None) -> ForwardOut:
        """Append ``tokens`` in n_batch chunks; return the last position's logits and hidden state.

        The hidden state costs nothing extra here, so it is always returned (``want_hidden`` is accepted
        for the protocol).
        """
        if not tokens:
            raise BackendError("prefill needs at least one token")
        self._drop_pending()
        self._room(len(tokens))
        out = None
        for start in range(0, len(tokens), self.n_batch):
            if start and cancel is not None and cancel():
                raise PrefillCancelled(f"prefill cancelled after {start} of {len(tokens)} tokens")
            chunk = list(tokens[start:start + self.n_batch])
            try:
                out = self._run(chunk, last_only=True)
            except Exception:
                self._set_offset(len(self.cached))
                raise
            self.cached.extend(chunk)
        self.n_prefilled += len(tokens)
        return out

    def forward(self, tokens: list[int], parents: list[int], want_hidden: bool = True) -> ForwardOut:
        n = len(tokens)
        if n == 0 or n != len(parents) or n > self.n_batch:
            raise BackendError(f"forward needs 1..{self.n_batch} tokens with one parent each")
        self._drop_pending()
        depths = tree_depths(parents)
        self._room(max(depths) + 1)
        chain = all(p == i - 1 for i, p in enumerate(parents))
        if not chain:
            self._tree.set(parents, len(self.cached), self.dtype)
        try:
            out = self._run(list(tokens))
        except Exception:
            self._set_offset(len(self.cached))
            raise
        finally:
            self._tree.clear()
        self._pending = (list(tokens), list(parents))
        return out

    def commit(self, path: list[int]) -> None:
        if self._pending is None:
            raise BackendError("commit without a pending forward")
        tokens, parents = self._pending
        check_path(path, parents)
        c, m = len(self.cached), len(path)
        if path != list(range(m)):  # the kept nodes are not already the first slots: gather them
            idx = mx.array([c + i for i in path], dtype=mx.int32)
            for cache in self._cache:
                cache.keys[..., c:c + m, :] = mx.take(cache.keys, idx, axis=2)
                cache.values[..., c:c + m, :] = mx.take(cache.values, idx, axis=2)
            mx.eval([a for cache in self._cache for a in (cache.keys, cache.values)])
        self._set_offset(c + m)
        self.cached.extend(tokens[i] for i in path)
        self._pending = None

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._set_offset(len(self.cached))
            self._pending = None

    def save_state(self) -> KVState:
        """Copies of the committed keys and values of every layer (mx arrays), with their tokens."""
        self._check_open()
        self._drop_pending()
        n = len(self.cached)
        data = [(c.keys[..., :n, :], c.values[..., :n, :]) if c.keys is not None else (None, None)
                for c in self._cache]
        mx.eval([a for kv in data for a in kv if a is not None])
        nbytes = sum(a.nbytes for kv in data for a in kv if a is not None)
        return KVState(list(self.cached), data, nbytes)

    def load_state(self, state: KVState) -> None:
        self._check_open()
        self._drop_pending()
        n = len(state.tokens)
        self._set_offset(0)
        self.cached = []
        if n:
            for c, (k, v) in zip(self._cache, state.data, strict=True):
                c.update_and_fetch(k, v)  # writes [0, n) and moves the offset to n
            mx.eval([a for c in self._cache for a in (c.keys, c.values)])
        self.cached = list(state.tokens)

    def _check_open(self) -> None:
        if self.model is None:
            raise BackendError("this model has been closed")

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.cached):
            raise BackendError(f"cannot truncate to {n}: {len(self.cached)} tokens cached")
        self._drop_pending()
        self._set_offset(n)
        del self.cached[n:]

    def close(self) -> None:
        if getattr(self, "_tok", None) is not None:
            self._tok.close()
            self._tok = None
            if self._old_limit is not None:
                mx.set_memory_limit(self._old_limit)
            self._cache = []
            self.model = None
            mx.clear_cache()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
