"""Distillation data at scale (v2): the target's own answers and teacher-forced text, in resumable shards.

What is collected (``corpus.Material``: stdlib and installed packages, never a benchmark):
- self-distillation: instructions answered by the target greedily (up to ``answer_tokens`` tokens or EOG),
  rendered exactly as the runtime renders a chat (``Runtime.encode_chat``, so the template's default system
  prompt included);
- the prompts themselves, teacher-forced (their positions are computed anyway to answer them);
- teacher-forced source and documentation windows (``tf_len`` tokens).

Every position keeps the token, the target's post-norm hidden state (fp16) and its top-``top_k`` next-token
log-probabilities (fp16, normalised over the full vocabulary). Each segment has a ``source`` kind (``SOURCES``)
and a ``weight`` (answers 1.0; teacher-forced text ``tf_weight``; prompts ``prompt_weight``).

Speed: independent sequences share each decode (``backends.multiseq``): up to ``slots`` answers grow one token
per step while prompts and teacher-forced text fill the rest of a ``rows``-row batch. On a CPU a 32-row decode
costs a handful of single steps, so positions come several times faster than one per target step.

Layout of ``out_dir`` (default ``~/.cache/edgespec/distill/<target>-v2/``):
- ``plan.json.gz``: the config and every shard's items with their prompt tokens, fixed when the collection
  starts (so a resumed collection uses exactly the same items, even if installed packages changed meanwhile);
- ``shard_00000.npz`` ...: ragged arrays (``tokens`` [P], ``hidden`` [P, d], ``top_ids`` / ``top_logp`` [P, k],
  ``offsets`` [N+1] into them, and per segment ``source``, ``weight``, ``item``, ``prompt_len``), each written
  atomically. ``load_shards`` reads them (padded to [N, T] for the trainer).

Resumable and deterministic: a shard depends only on its items and the config (the KV cache is emptied
before each one and the batch schedule is a function of the items), so a collection killed at any moment
continues from its last complete shard and ends with the same shards as one never interrupted (same model
file, same llama.cpp build). Collection stops at the shortest prefix of the plan holding ``positions``.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgespec.models.drafting.redrafter import save_npz_atomic
from edgespec.models.training.corpus import CODE_KIND_WEIGHTS, Decontaminator, Material

VERSION = 2
SOURCES = ("code", "docs", "prompt", *sorted(CODE_KIND_WEIGHTS), "question")  # index = a segment's ``source``
TEXT_KINDS = ("code", "docs")


@dataclass
class CollectConfig:
    prompts_per_shard: int = 32  # instructions per shard
    texts_per_shard: int = 16  # teacher-forced windows per shard (code and docs alternating)
    answer_tokens: int = 511  # greedy answer length cap (EOG ends an answer earlier)
    max_prompt: int = 768  # instructions longer than this (chat-templated) are skipped
    tf_len: int = 512  # tokens per teacher-forced window
    min_tf: int = 128  # shorter windows are skipped
    top_k: int = 32
    slots: int = 16  # answers generated at once (sequence ids 0..slots-1; teacher-forced text uses ``slots``)
    rows: int = 64  # rows per decode
    tf_weight: float = 0.5
    prompt_weight: float = 0.25
    seed: int = 0

    def n_ctx(self) -> int:
        """KV cells for every slot at its longest, plus the teacher-forced sequence."""
        return self.slots * (self.max_prompt + self.answer_tokens + 1) + self.tf_len + 64

    def est_positions(self) -> int:
        """A rough guess of one shard's positions (for sizing the plan)."""
        return self.prompts_per_shard * (self.max_prompt // 3 + self.answer_tokens // 2) \
            + self.texts_per_shard * self.tf_len


def default_dir(target: str) -> Path:
    from edgespec import paths, registry

    return paths.cache_dir() / "distill" / f"{registry.model_key(target)}-v2"


# ---- the plan ---------------------------------------------------------------------------------------------------
class Planner:
    """Draws shards of items from ``Material`` and tokenizes them: instructions through the runtime's chat
    rendering, texts as raw completions (BOS where the model adds one)."""

    def __init__(self, backend, cfg: CollectConfig, seed: int, roots=None, exclude: set[str] | None = None,
                 decontaminate: Decontaminator | None = None):
        from edgespec.runtime import Runtime

        self.backend, self.cfg = backend, cfg
        self.rt = Runtime(backend, model=backend.info.name)  # no drafter: only its encode_chat is used
        self.material = Material(seed, roots, decontaminate=decontaminate, exclude=exclude)
        self.n_text = 0

    def chat_tokens(self, text: str) -> list[int]:
        return self.rt.encode_chat([{"role": "user", "content": text}])

    def shard(self) -> list[dict] | None:
        """One shard's items, or None when the material has run out."""
        items = []
        while sum(it["kind"] not in TEXT_KINDS for it in items) < self.cfg.prompts_per_shard:
            it = self.material.instruction()
            if it is None:
                return None
            toks = self.chat_tokens(it.text)
            if len(toks) <= self.cfg.max_prompt:
                items.append({"kind": it.kind, "origin": it.origin, "text": it.text, "tokens": toks})
        n = 0
        while n < self.cfg.texts_per_shard:
            kind = TEXT_KINDS[self.n_text % 2]
            it = self.material.text(kind)
            if it is None:
                return None
            toks = self.backend.tokenize(it.text, add_special=True, parse_special=False)[:self.cfg.tf_len]
            if len(toks) >= self.cfg.min_tf:  # a window too short is skipped without changing whose turn it is
                items.append({"kind": it.kind, "origin": it.origin, "text": it.text, "tokens": toks})
                self.n_text += 1
                n += 1
        return items


def _write_json_gz(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(obj, f)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_plan(out_dir: Path) -> dict | None:
    p = out_dir / "plan.json.gz"
    if not p.exists():
        return None
    with gzip.open(p, "rt", encoding="utf-8") as f:
        return json.load(f)


def model_id(backend) -> dict:
    info = backend.info
    return {"name": info.name, "n_vocab": info.n_vocab, "n_embd": info.n_embd,
            "file_bytes": Path(backend.path).stat().st_size}


def ensure_plan(backend, out_dir: Path, cfg: CollectConfig, positions: int, roots=None,
                decontaminate: Decontaminator | None = None, log=print) -> dict:
    """The collection's plan: read from ``out_dir`` (checked against ``cfg`` and the model), or built with
    room for ``positions``; extended with fresh items (new seed, no origin repeated) when too short."""
    plan = load_plan(out_dir)
    if plan is not None:
        if plan["config"] != asdict(cfg) or plan["model"] != model_id(backend):
            raise ValueError(f"{out_dir} holds a collection with another config or model "
                             f"({plan['config']}, {plan['model']}); use another directory or remove it")
    else:
        plan = {"version": VERSION, "config": asdict(cfg), "model": model_id(backend), "extensions": 0,
                "shards": []}
    want = math.ceil(1.3 * positions / cfg.est_positions()) + 1
    if len(plan["shards"]) >= want:
        return plan
    ext = plan["extensions"]
    used = {it["origin"] for sh in plan["shards"] for it in sh}
    log(f"planning {want - len(plan['shards'])} shards of {cfg.prompts_per_shard} instructions and "
        f"{cfg.texts_per_shard} texts (seed {cfg.seed}, extension {ext})")
    planner = Planner(backend, cfg, cfg.seed + 1000 * ext, roots, exclude=used, decontaminate=decontaminate)
    while len(plan["shards"]) < want:
        sh = planner.shard()
        if sh is None:
            log(f"the offline material ran out after {len(plan['shards'])} shards")
            break
        plan["shards"].append(sh)
    plan["extensions"] = ext + 1
    _write_json_gz(out_dir / "plan.json.gz", plan)
    return plan


# ---- one shard --------------------------------------------------------------------------------------------------
def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` token ids (by logit, ties by id, so column 0 is argmax) and their log-probabilities.

    With torch installed (the ``train`` extra) the selection and the log-normaliser run in torch: 0.17 s for a
    512-row batch of qwen2.5-coder-1.5b's 151,936 logits against 2.7 s in numpy (measured on the Intel Xeon),
    which was a third of a teacher-forced window's time. Both give the same ids and values except for ties at
    the k-th place."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        top, idx = (a.numpy() for a in torch.topk(t, k + 1, dim=1))
        lse = torch.logsumexp(t, dim=1).numpy()
    else:
        idx = np.argpartition(-logits, k, axis=1)[:, :k + 1]
        top = np.take_along_axis(logits, idx, axis=1)
        mx = top.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
    order = np.lexsort((idx, -top), axis=1)[:, :k]
    idx, top = np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)
    return idx.astype(np.int32), top - lse[:, None]


class _Seq:
    """One sequence in flight: tokens still to feed, and what was fed with its outputs."""

    def __init__(self, item: int, tokens: list[int], answer: bool):
        self.item, self.pending, self.answer = item, deque(tokens), answer
        self.prompt_len = len(tokens) if answer else 0
        self.fed: list[int] = []
        self.out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (hidden, top_ids, top_logp) chunks


def collect_shard(ms, items: list[dict], cfg: CollectConfig, eog: frozenset[int], progress=None) -> dict:
    """Run one shard's items through the target (``ms``: a ``MultiSeq``); return its arrays."""
    ms.clear()
    tf_seq = cfg.slots
    answers = deque(i for i, it in enumerate(items) if it["kind"] not in TEXT_KINDS)
    texts = deque(i for i, it in enumerate(items) if it["kind"] in TEXT_KINDS)
    slots: list[_Seq | None] = [None] * cfg.slots
    tf: _Seq | None = None
    done: list[_Seq] = []
    while True:
        for s in range(cfg.slots):
            if slots[s] is None and answers:
                i = answers.popleft()
                slots[s] = _Seq(i, items[i]["tokens"], True)
        if tf is None and texts:
            i = texts.popleft()
            tf = _Seq(i, items[i]["tokens"], False)
        # rows: one per answer being generated, then prompts (in slot order), then teacher-forced text
        rows: list[tuple[int, _Seq]] = []
        gen = [(s, q) for s, q in enumerate(slots) if q is not None and len(q.fed) >= q.prompt_len - 1]
        pre = [(s, q) for s, q in enumerate(slots) if q is not None and len(q.fed) < q.prompt_len - 1]
        for s, q in gen + pre + ([(tf_seq, tf)] if tf is not None else []):
            take = min(len(q.pending), cfg.rows - len(rows))
            rows += [(s, q)] * take
        if not rows:
            break
        toks, pos, seqs = [], [], []
        start: dict[int, int] = {}
        for s, q in rows:
            j = start.setdefault(s, 0)
            start[s] = j + 1
            toks.append(q.pending[j])
            pos.append(len(q.fed) + j)
            seqs.append(s)
        logits, hidden = ms.decode(toks, pos, seqs, outputs=True)
        ids, logp = top_logprobs(logits, cfg.top_k)
        h16 = hidden.astype(np.float16)
        r = 0
        for s, n in start.items():
            q = tf if s == tf_seq else slots[s]
            for _ in range(n):
                q.fed.append(q.pending.popleft())
            q.out.append((h16[r:r + n], ids[r:r + n], logp[r:r + n].astype(np.float16)))
            r += n
            if q.pending:
                continue
            nxt = int(ids[r - 1, 0])
            if q.answer and nxt not in eog and len(q.fed) - q.prompt_len < cfg.answer_tokens:
                q.pending.append(nxt)  # the target's greedy token: fed at the next step
                continue
            done.append(q)
            ms.remove(s)
            if s == tf_seq:
                tf = None
            else:
                slots[s] = None
        if progress is not None:
            progress(len(rows))
    return _arrays(sorted(done, key=lambda q: q.item), items, cfg)


def _arrays(seqs: list[_Seq], items: list[dict], cfg: CollectConfig) -> dict[str, np.ndarray]:
    """Ragged shard arrays; an answered instruction makes two segments: its prompt up to the last prompt token
    (kind "prompt") and the answer from the last prompt token on (the instruction's kind)."""
    segs = []  # (tokens, hidden, ids, logp, source, weight, item, prompt_len)
    for q in seqs:
        tok = np.asarray(q.fed, np.int32)
        h, ids, lp = (np.concatenate([o[k] for o in q.out]) for k in range(3))
        kind = items[q.item]["kind"]
        if q.answer:
            c = q.prompt_len - 1
            if c > 0:
                segs.append((tok[:c], h[:c], ids[:c], lp[:c], "prompt", cfg.prompt_weight, q.item, q.prompt_len))
            segs.append((tok[c:], h[c:], ids[c:], lp[c:], kind, 1.0, q.item, q.prompt_len))
        else:
            segs.append((tok, h, ids, lp, kind, cfg.tf_weight, q.item, 0))
    lens = [len(s[0]) for s in segs]
    return {"tokens": np.concatenate([s[0] for s in segs]), "hidden": np.concatenate([s[1] for s in segs]),
            "top_ids": np.concatenate([s[2] for s in segs]), "top_logp": np.concatenate([s[3] for s in segs]),
            "offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            "source": np.array([SOURCES.index(s[4]) for s in segs], np.int8),
            "weight": np.array([s[5] for s in segs], np.float32),
            "item": np.array([s[6] for s in segs], np.int32),
            "prompt_len": np.array([s[7] for s in segs], np.int32)}


# ---- the collection ---------------------------------------------------------------------------------------------
def shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / f"shard_{i:05d}.npz"


def shard_positions(path: Path) -> int:
    with np.load(path) as z:
        return int(z["offsets"][-1])


def composition(path: Path) -> dict[str, int]:
    """Positions per source kind in one shard."""
    with np.load(path) as z:
        lens, src = np.diff(z["offsets"]), z["source"]
    return {SOURCES[k]: int(lens[src == k].sum()) for k in np.unique(src)}


class Interrupted(Exception):
    pass


def _lock(out_dir: Path):
    f = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"another collection is running in {out_dir}") from None
    return f


def collect(backend, out_dir: Path, cfg: CollectConfig, positions: int, roots=None, progress: bool = True,
            stop_after: int | None = None, decontaminate: Decontaminator | None = None, log=None) -> list[Path]:
    """Collect shards until they hold ``positions`` positions; return the shards (resumes what is on disk).

    ``backend``: a ``LlamaCppBackend`` with ``n_ctx >= cfg.n_ctx()``, ``n_seq_max > cfg.slots`` and
    ``n_batch >= cfg.rows`` (``open_backend`` makes one). ``stop_after``: raise ``Interrupted`` after writing
    that many new shards (tests)."""
    from edgespec.backends.multiseq import MultiSeq

    if backend.n_seq_max <= cfg.slots or backend.n_ctx < cfg.n_ctx() or backend.n_batch < cfg.rows:
        raise ValueError(f"the backend needs n_seq_max > {cfg.slots}, n_ctx >= {cfg.n_ctx()}, n_batch >= {cfg.rows}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    lock = _lock(out_dir)
    ms = MultiSeq(backend, cfg.rows)
    try:
        for stale in out_dir.glob("*.tmp"):  # left by a kill during a write (we hold the lock)
            stale.unlink(missing_ok=True)
        plan = ensure_plan(backend, out_dir, cfg, positions, roots, decontaminate, log)
        have = 0
        paths: list[Path] = []
        for i in range(len(plan["shards"])):
            if have >= positions or not shard_path(out_dir, i).exists():
                break
            have += shard_positions(shard_path(out_dir, i))
            paths.append(shard_path(out_dir, i))
        bar = tqdm(total=positions, initial=min(have, positions), unit="pos", desc=f"collect {out_dir.name}",
                   disable=not progress, smoothing=0.05, mininterval=1 if sys.stderr.isatty() else 60, file=sys.stderr)
        new, t_start, pos_start = 0, time.perf_counter(), have
        i = len(paths)
        while have < positions:
            if i >= len(plan["shards"]):
                plan = ensure_plan(backend, out_dir, cfg, 2 * positions, roots, decontaminate, log)
                if i >= len(plan["shards"]):
                    log(f"stopped at {have} positions: no material left for more shards")
                    break
            path = shard_path(out_dir, i)
            if path.exists():  # written by an earlier run past a gap
                n = shard_positions(path)
                bar.update(n)
            else:
                t0, before = time.perf_counter(), bar.n
                arrays = collect_shard(ms, plan["shards"][i], cfg, backend.info.eog, bar.update)
                save_npz_atomic(path, arrays)
                n = int(arrays["offsets"][-1])
                bar.update(n - (bar.n - before))  # rows counted during the shard == n
                new += 1
                dt = time.perf_counter() - t0
                comp = composition(path)
                log(f"shard {i}: {n} positions in {dt:.0f} s ({n / dt:.1f}/s; "
                    + ", ".join(f"{k} {v}" for k, v in sorted(comp.items())) + f"); total {have + n}/{positions}, "
                    f"session {(have + n - pos_start) / (time.perf_counter() - t_start):.1f} positions/s")
            have += n
            paths.append(path)
            i += 1
            if stop_after is not None and new >= stop_after and have < positions:
                raise Interrupted(f"stopped after {new} new shards")
        bar.close()
        return paths
    finally:
        ms.close()
        backend.truncate(0)
        lock.close()


def open_backend(gguf: Path, cfg: CollectConfig, threads: int | None = None):
    from edgespec.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(gguf, n_ctx=cfg.n_ctx(), n_threads=threads, n_batch=max(512, cfg.rows),
                           n_seq_max=cfg.slots + 1)


def run(target: str, positions: int, threads: int | None = None, out_dir: Path | None = None,
        cfg: CollectConfig | None = None) -> list[Path]:
    """``edgespec train-drafter --collect-only``: collect (or resume) ``positions`` positions for ``target``."""
    from edgespec import registry

    cfg = cfg or CollectConfig()
    out_dir = out_dir or default_dir(target)
    backend = open_backend(registry.resolve(target), cfg, threads)
    try:
        return collect(backend, out_dir, cfg, positions)
    finally:
        backend.close()


# ---- reading shards ------------------------------------------------------------------------------------------
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
SEGMENT_KEYS = ("source", "weight", "item", "prompt_len")  # per segment, of a shard


def _padded(z, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One (ragged, ``offsets``) shard as padded [N, T] arrays."""
    off = z["offsets"]
    flat = {k: z[k] for k in keys if k in DATA_KEYS}  # each z[k] reads the file again: once per key
    rows = [{k: v[a:b] for k, v in flat.items()} for a, b in zip(off[:-1], off[1:], strict=True)]
    out = _stack(rows, int(np.diff(off).max())) if rows else {}
    out.update({k: z[k] for k in keys if k in SEGMENT_KEYS})
    return out


def load_shards(paths: list[Path], keys: tuple[str, ...] = DATA_KEYS) -> dict[str, np.ndarray]:
    """Shards as padded [N, T, ...] arrays (tokens -1 mark padding, T the longest segment); ``keys``: the arrays
    wanted."""
    parts = []
    for p in paths:
        with np.load(p) as z:
            part = _padded(z, keys)
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
