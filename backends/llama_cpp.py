"""llama.cpp backend, on the low-level ctypes API of llama-cpp-python.

One context with ``embeddings=True`` and no pooling, so that every decode yields the logits and the
post-final-norm hidden state of each output row. The KV cache is unified across sequences; a token
tree is verified in one batch by giving each leaf its own sequence id and each node the ids of the
leaves below it. The committed prefix lives in sequence 0.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from pathlib import Path

import llama_cpp as lc
import numpy as np

from edgespec.backends import hugepages
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
    usable_cpus,
)

KV_TYPES = {"f16": (lc.GGML_TYPE_F16, 2.0), "q8_0": (lc.GGML_TYPE_Q8_0, 34 / 32), "q4_0": (lc.GGML_TYPE_Q4_0, 18 / 32)}

EXACT_CPU_ROWS = 3
# With AMX (EDGESPEC_AMX=1 builds) one row runs the VNNI kernel and 2-32 rows the AMX tiles, and they round alike:
# batches of up to 32 rows matched single-token decoding bit for bit (both Qwen models, measured in session 10).
EXACT_AMX_ROWS = 32
# llama.cpp pads the KV view to 256 cells; from 512 cells on, a single-token decode splits flash attention over
# the KV cache across threads (ggml's split-KV path, a different summation order) while batches of 2+ rows do not.
EXACT_CPU_CONTEXT = 256
_LOG: deque[str] = deque(maxlen=50)
_VERBOSE = bool(os.environ.get("EDGESPEC_VERBOSE"))


@lc.llama_log_callback
def _log_callback(level, text, user_data):  # keep llama.cpp quiet, but remember what it said
    msg = text.decode("utf-8", errors="replace")
    _LOG.append(msg)
    if _VERBOSE:
        print(msg, end="", flush=True)


_initialized = False


def amx_build() -> bool:
    """Was the loaded llama.cpp built with AMX (``EDGESPEC_AMX=1 bash scripts/setup.sh``)?"""
    return b"AMX_INT8 = 1" in lc.llama_print_system_info()


def init_once() -> None:
    global _initialized
    if not _initialized:
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _initialized = True


class LoadError(BackendError):
    pass


def meta_str(model, key: str) -> str | None:
    """A GGUF metadata value as text, or None."""
    buf = ctypes.create_string_buffer(1 << 16)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


def tokenize(vocab, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (lc.llama_token * n_max)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        n_max = -n
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    return list(buf[:n])


def token_piece(vocab, token: int, special: bool = False) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


class LlamaCppBackend:
    """A GGUF model and its KV cache in llama.cpp."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 4096, n_threads: int | None = None,
                 kv_type: str = "f16", n_batch: int = 512, n_seq_max: int = 8, flash_attn: bool = True,
                 mmap: bool | None = None, kv_unified: bool = True, huge_pages: bool | None = None):
        init_once()
        if kv_type not in KV_TYPES:
            raise BackendError(f"kv_type must be one of {list(KV_TYPES)}, not {kv_type!r}")
        if n_ctx < 16:
            raise BackendError(f"n_ctx must be at least 16, not {n_ctx}")
        self.path = str(path)
        mparams = lc.llama_model_default_params()
        # No mmap on CPU: llama.cpp repacks many quantized tensors into a second buffer, and the mmapped
        # originals then stay resident too (qwen2.5-coder-1.5b: 1887 MiB RSS with mmap, 1291 without).
        if mmap is None:
            mmap = sys.platform == "darwin"
        mparams.load_mode = lc.LLAMA_LOAD_MODE_MMAP if mmap else lc.LLAMA_LOAD_MODE_NONE
        _LOG.clear()
        before = hugepages.snapshot() if hugepages.enabled(huge_pages) else None
        self._model = lc.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise LoadError(f"llama.cpp could not load {self.path}:\n" + "".join(list(_LOG)[-5:]).strip())
        self._vocab = lc.llama_model_get_vocab(self._model)
        # a thread beyond the CPUs the process may run on only waits at llama.cpp's spinning barrier
        n_threads = min(n_threads or 8, usable_cpus())
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        cparams.kv_unified = kv_unified  # tree branches share the prompt's cells (needed for trees)
        cparams.swa_full = True  # sliding-window caches must be trimmable for rollback
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type][0]
        # Flash attention: a quantized V cache needs it, and with it a tree node's outputs equal those of
        # its branch evaluated as a chain, bit for bit (without it they differ by up to ~0.4 in logits).
        if not flash_attn and kv_type != "f16":
            raise BackendError("a quantized KV cache needs flash attention")
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise LoadError(f"llama.cpp could not create a context (n_ctx={n_ctx}):\n" + "".join(_LOG).strip())
        self._mem = lc.llama_get_memory(self._ctx)
        # weights, repacked weights and KV cache in 2 MiB pages: fewer page walks per decoding step
        self.huge_pages = hugepages.collapse_new(before) if before is not None else None
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = lc.llama_n_batch(self._ctx)  # llama.cpp caps the batch at n_ctx: use what it kept
        self.n_seq_max = n_seq_max
        self.n_threads = n_threads
        self.kv_type = kv_type
        self._batch = lc.llama_batch_init(n_batch, 0, n_seq_max)
        self._embeddings = True  # the context's current embeddings switch (llama_set_embeddings)
        self.cached: list[int] = []
        self._pending: tuple[list[int], list[int], list[list[int]]] | None = None  # tokens, parents, seqs
        self._piece_cache: dict[int, bytes] = {}
        self.info = self._read_info()
        self.n_prefilled = 0  # tokens evaluated by prefill since load (for cache-reuse stats)
        # On the CPU a batch of 1-3 rows runs the same matrix-vector kernels as single-token decoding, so
        # its logits are bit-identical to plain decoding's; from 4 rows on the repacked quantized weights go
        # through GEMM kernels that round differently (logits move by up to ~0.5), which can flip a near-tie.
        # GPU builds (Metal, CUDA) switch kernels at other sizes: no cap there, near-ties may part.
        # That holds only while the KV view is under 512 cells (EXACT_CPU_CONTEXT): beyond it single-token decoding
        # runs another attention kernel, so no batch of 2+ rows matches it bit for bit (logits differ by ~0.3).
        self.exact_rows = None if lc.llama_supports_gpu_offload() else EXACT_AMX_ROWS if amx_build() else EXACT_CPU_ROWS
        self.exact_context = None if self.exact_rows is None else EXACT_CPU_CONTEXT

    # ---- metadata -------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        return meta_str(self._model, key)

    def _read_info(self) -> ModelInfo:
        n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        eog = frozenset(t for t in range(n_vocab) if lc.llama_vocab_is_eog(self._vocab, t))
        bos = lc.llama_vocab_bos(self._vocab)
        eos = lc.llama_vocab_eos(self._vocab)
        tmpl = lc.llama_model_chat_template(self._model, None)
        arch = self.meta("general.architecture") or "unknown"
        return ModelInfo(
            name=self.meta("general.name") or Path(self.path).stem,
            arch=arch,
            n_layer=lc.llama_model_n_layer(self._model),
            n_embd=lc.llama_model_n_embd(self._model),
            n_head=lc.llama_model_n_head(self._model),
            n_head_kv=lc.llama_model_n_head_kv(self._model),
            n_vocab=n_vocab,
            n_ctx_train=lc.llama_model_n_ctx_train(self._model),
            bos=bos if bos >= 0 else None,
            eog=eog,
            add_bos=bool(lc.llama_vocab_get_add_bos(self._vocab)),
            chat_template=tmpl.decode("utf-8") if tmpl else None,
            bos_text=self._piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_text=self._piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
        )

    def _head_dims(self) -> tuple[int, int]:
        arch = self.info.arch
        k = self.meta(f"{arch}.attention.key_length")
        v = self.meta(f"{arch}.attention.value_length")
        hd = self.info.n_embd // self.info.n_head
        return (int(k) if k else hd), (int(v) if v else hd)

    def memory(self) -> MemoryInfo:
        self._check_open()
        hk, hv = self._head_dims()
        per_tok = self.info.n_layer * self.info.n_head_kv * (hk + hv) * KV_TYPES[self.kv_type][1]
        return MemoryInfo(weights_bytes=int(lc.llama_model_size(self._model)), kv_bytes_per_token=int(per_tok),
                          n_ctx=self.n_ctx, n_cached=len(self.cached))

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self._check_open()
        return tokenize(self._vocab, text, add_special, parse_special)

    def _piece(self, token: int, special: bool = False) -> bytes:
        return token_piece(self._vocab, token, special)

    def tensor_rows(self, *names: str) -> list:
        from edgespec.backends.gguf_file import tensor_rows

        return tensor_rows(self.path, *names)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token contributes to the text (control tokens contribute none)."""
        b = self._piece_cache.get(token)
        if b is None:
            self._check_open()
            b = self._piece_cache[token] = self._piece(token)
        return b

    # ---- decoding -------------------------------------------------------------------------------
    def _decode(self, tokens: list[int], pos: list[int], seqs: list[list[int]], out: list[bool]) -> None:
        self._check_open()
        b = self._batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos[i]
            b.n_seq_id[i] = len(seqs[i])
            for j, s in enumerate(seqs[i]):
                b.seq_id[i][j] = s
            b.logits[i] = out[i]
        rc = lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc}" + (" (KV cache full)" if rc == 1 else ""))

    def _outputs(self, n: int, hidden: bool = True) -> ForwardOut:
        V, d = self.info.n_vocab, self.info.n_embd
        logits = np.ctypeslib.as_array(lc.llama_get_logits(self._ctx), shape=(n * V,)).reshape(n, V).copy()
        if not hidden:
            return ForwardOut(logits=logits, hidden=None)
        h = np.ctypeslib.as_array(lc.llama_get_embeddings(self._ctx), shape=(n * d,)).reshape(n, d).copy()
        return ForwardOut(logits=logits, hidden=h)

    def _room(self, n: int) -> None:
        if len(self.cached) + n > self.n_ctx:
            raise ContextFullError(f"context full: {len(self.cached)} cached + {n} new > n_ctx={self.n_ctx}")

    def prefill(self, tokens: list[int], want_hidden: bool = False, cancel=None) -> ForwardOut:
        """Evaluate ``tokens`` in n_batch chunks and return the last position's outputs.

        With embeddings on, llama.cpp outputs every row of a batch (and runs the LM head on all of
        them), so the bulk runs with embeddings off. The last token is always decoded on its own (with
        embeddings on when ``want_hidden``): llama.cpp picks other matmul kernels for large batches, so
        a last token evaluated inside a chunk would leave a slightly different KV entry and logits than
        one evaluated alone, and plain and hidden-state runs could then part at a near-tie.
        """
        if not tokens:
            raise BackendError("prefill needs at least one token")
        self._check_open()
        self._drop_pending()
        self._room(len(tokens))
        bulk = tokens[:-1]
        self._set_embeddings(False)
        try:
            for start in range(0, len(bulk), self.n_batch):
                if cancel is not None and cancel():
                    raise PrefillCancelled(f"prefill cancelled after {start} of {len(tokens)} tokens")
                chunk = bulk[start:start + self.n_batch]
                p0 = len(self.cached)
                self._decode(chunk, list(range(p0, p0 + len(chunk))), [[0]] * len(chunk), [False] * len(chunk))
                self.cached.extend(chunk)
            self._set_embeddings(want_hidden)
            self._decode([tokens[-1]], [len(self.cached)], [[0]], [True])
            self.cached.append(tokens[-1])
        finally:
            self._set_embeddings(want_hidden)
        self.n_prefilled += len(tokens)
        return self._outputs(1, want_hidden)

    def _set_embeddings(self, on: bool) -> None:
        """Hidden states cost an extra output copy per row and keep every output row alive in llama.cpp's
        graph; they are switched on only for decodes whose caller reads them."""
        if on != self._embeddings:
            lc.llama_set_embeddings(self._ctx, on)
            self._embeddings = on

    def forward(self, tokens: list[int], parents: list[int], want_hidden: bool = True) -> ForwardOut:
        self._check_open()
        n = len(tokens)
        if n == 0 or n != len(parents) or n > self.n_batch:
            raise BackendError(f"forward needs 1..{self.n_batch} tokens with one parent each")
        self._drop_pending()
        depths = tree_depths(parents)
        self._room(max(depths) + 1)
        seqs = self._assign_seqs(parents)
        n_seqs = 1 + max(s for ss in seqs for s in ss)
        for s in range(1, n_seqs):  # share the committed prefix with every branch (metadata only)
            lc.llama_memory_seq_cp(self._mem, 0, s, -1, -1)
        c = len(self.cached)
        self._pending = (list(tokens), list(parents), seqs)
        self._set_embeddings(want_hidden)
        self._decode(tokens, [c + d for d in depths], seqs, [True] * n)
        return self._outputs(n, want_hidden)

    def _assign_seqs(self, parents: list[int]) -> list[list[int]]:
        n = len(parents)
        has_child = [False] * n
        for p in parents:
            if p >= 0:
                has_child[p] = True
        leaves = [i for i in range(n) if not has_child[i]]
        if len(leaves) > self.n_seq_max:
            raise BackendError(f"tree has {len(leaves)} leaves; this backend verifies at most {self.n_seq_max}")
        seqs: list[list[int]] = [[] for _ in range(n)]
        for s, leaf in enumerate(leaves):
            i = leaf
            while i >= 0:
                seqs[i].append(s)
                i = parents[i]
        return seqs

    def commit(self, path: list[int]) -> None:
        self._check_open()
        if self._pending is None:
            raise BackendError("commit without a pending forward")
        tokens, parents, seqs = self._pending
        check_path(path, parents)
        c = len(self.cached)
        keep_end = c + len(path)
        n_seqs = 1 + max(s for ss in seqs for s in ss)
        if n_seqs == 1:
            self._seq_rm(0, keep_end, -1)
        else:
            s = seqs[path[-1]][0] if path else 0  # a branch that contains the whole path
            lc.llama_memory_seq_keep(self._mem, s)
            self._seq_rm(s, keep_end, -1)
            if s != 0:
                lc.llama_memory_seq_cp(self._mem, s, 0, -1, -1)
                self._seq_rm(s, -1, -1)
        self.cached.extend(tokens[i] for i in path)
        self._pending = None

    def _drop_pending(self) -> None:
        """Forget an uncommitted tree: remove its nodes and the prefix copies of its branches."""
        if self._pending is None:
            return
        _, _, seqs = self._pending
        n_seqs = 1 + max(s for ss in seqs for s in ss)
        for s in range(1, n_seqs):
            self._seq_rm(s, -1, -1)
        self._seq_rm(0, len(self.cached), -1)
        self._pending = None

    def save_state(self) -> KVState:
        """The committed sequence's KV state (llama.cpp's per-sequence state API), with its tokens."""
        self._check_open()
        self._drop_pending()
        size = lc.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = lc.llama_state_seq_get_data(self._ctx, buf, size, 0)
        if n != size:
            raise BackendError(f"llama.cpp saved {n} of {size} state bytes")
        return KVState(list(self.cached), bytes(buf), size)

    def load_state(self, state: KVState) -> None:
        self._check_open()
        self._drop_pending()
        self._seq_rm(-1, -1, -1)
        self.cached = []
        if not state.tokens:
            return
        buf = (ctypes.c_uint8 * state.nbytes).from_buffer_copy(state.data)
        if lc.llama_state_seq_set_data(self._ctx, buf, state.nbytes, 0) == 0:
            raise BackendError("llama.cpp could not restore a saved KV state (from another model or context?)")
        self.cached = list(state.tokens)

    def _check_open(self) -> None:
        if not getattr(self, "_ctx", None):
            raise BackendError("this model has been closed")

    def _seq_rm(self, seq: int, p0: int, p1: int) -> None:
        if not lc.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise BackendError(f"llama.cpp could not remove positions [{p0}, {p1}) of sequence {seq}")

    def truncate(self, n: int) -> None:
        self._check_open()
        if not 0 <= n <= len(self.cached):
            raise BackendError(f"cannot truncate to {n}: {len(self.cached)} tokens cached")
        self._drop_pending()
        self._seq_rm(-1, n, -1)
        del self.cached[n:]

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
