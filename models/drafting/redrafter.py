"""ReDrafter: an RNN draft head on the target's last hidden state, with beam search into a token tree.

One step of the head (paper 2403.09919, notes §5), for draft state ``s`` and target hidden ``h``:

    s' = SiLU(E[token] W_e + s U + b_s)           E: the target's own input embeddings (from its GGUF)
    x  = h W_h + b_x + s' W_s                     = concat(h, s') @ [W_h; W_s] + b_x
    x  = x + SiLU(x W_k + b_k)                    k = 1..n_blocks residual blocks
    logits = x O_v^T + bias                       the target's own output rows O_v, draft vocabulary only

The draft vocabulary is the most frequent target tokens (``vocab`` maps draft ids back to target
ids). The head is shared with the target (its GGUF ``output.weight`` rows, never shipped); only the
bias is learned. At inference a rank-r SVD of O_v (shipped, ``head_a``/``head_b``) shortlists the
top-m tokens and the exact rows rescore them, so a step costs r*(d + V_d) + m*d multiply-adds instead
of d*V_d. ``step`` is written with ``@``, ``+`` and ``xp.exp`` only, so the same function runs in numpy (the fast
path on a CPU: MLX's Linux CPU build has no fast BLAS, notes §2), MLX (Metal) and torch (training).

Drafting: beam search of width w and length L, the first input being the target's own next token (the
root). Beams are packed into a prefix-deduplicated tree, and nodes are kept best-first while the
calibrated probability of their whole path pays for their verify cost (``TreeShape.worth``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from edgespec.memory.live import return_large_frees
from edgespec.models.drafting.drafter import DraftContext, DraftTree, TreeShape, VerifyResult, pack_beams

WEIGHTS_DIR = Path(__file__).parent.parent / "weights"  # models/weights: shipped heads (package data)
# a loaded head's resident bytes beyond its arrays: the modules it brings in (the gguf package it reads the
# target's rows with: +4.2 MiB imported; its own, +1.3 MiB), the GGUF header reader,
# working buffers and allocator slack. Measured in a fresh process (scripts/drafter_rss.py, 2-core Xeon):
# qwen2.5-coder-1.5b's shipped head grew RSS by 61.7-67.2 MiB (arrays 43.8 MiB), the 0.5b's by 39.5 (21.6)
HEAD_SLACK = 18 << 20
FORMAT_VERSION = 1


@dataclass
class ReDrafterConfig:
    target: str  # model id the head was trained for
    n_embd: int  # the target's hidden size
    n_vocab: int  # the target's vocabulary size
    d_rnn: int = 256
    n_blocks: int = 1
    rank: int = 128  # of the shortlist head
    shortlist: int = 64  # tokens rescored with the exact output rows
    h_scale: float = 1.0  # fixed input scalings (1 / RMS of the training inputs)
    e_scale: float = 1.0


def silu(x, xp):
    return x / (1.0 + xp.exp(-x))


def param_shapes(cfg: ReDrafterConfig, n_draft: int) -> dict[str, tuple[int, ...]]:
    shapes = {"w_e": (cfg.n_embd, cfg.d_rnn), "u": (cfg.d_rnn, cfg.d_rnn), "b_s": (cfg.d_rnn,),
              "w_h": (cfg.n_embd, cfg.n_embd), "w_s": (cfg.d_rnn, cfg.n_embd), "b_x": (cfg.n_embd,),
              "bias": (n_draft,)}
    for k in range(cfg.n_blocks):
        shapes[f"w{k}"], shapes[f"b{k}"] = (cfg.n_embd, cfg.n_embd), (cfg.n_embd,)
    return shapes


def hidden_part(p: dict, h):
    """``h W_h + b_x``: the target hidden's share of x, fixed for a whole draft (computed once)."""
    return h @ p["w_h"] + p["b_x"]


def step(p: dict, n_blocks: int, hx, e_proj, s, xp):
    """One draft step. ``hx``: ``hidden_part`` of the scaled target hidden [B, n_embd]; ``e_proj``:
    ``E[token] W_e`` [B, d_rnn]; ``s``: previous state [B, d_rnn]. Returns (new state, head input x)."""
    s = silu(e_proj + s @ p["u"] + p["b_s"], xp)
    x = hx + s @ p["w_s"]
    for k in range(n_blocks):
        x = x + silu(x @ p[f"w{k}"] + p[f"b{k}"], xp)
    return s, x


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---- weights on disk ---------------------------------------------------------------------------------
def weights_path(target: str) -> Path:
    return WEIGHTS_DIR / f"redrafter-{target}.npz"


def save(path: Path, cfg: ReDrafterConfig, vocab: np.ndarray, params: dict[str, np.ndarray],
         base: str | None = None) -> None:
    """Write fp16 weights atomically, with the config, a format version and a SHA-256 of the arrays.
    ``base``: for an adapted state, the ``file_digest`` of the weights it was adapted from."""
    arrays = {k: np.asarray(v, np.float16) for k, v in params.items()}
    arrays["vocab"] = np.asarray(vocab, np.int32)
    meta = {"config": asdict(cfg), "version": FORMAT_VERSION, "sha256": _digest(arrays)}
    if base is not None:
        meta["base"] = base
    save_npz_atomic(path, {"meta": np.array(json.dumps(meta)), **arrays})


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that a crash leaves either the old file or the new one, and two processes saving at
    once leave one of theirs whole: a temporary file of a unique name, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


META_KEYS = {"config", "version", "sha256", "base"}


def read_meta(path: Path) -> dict:
    """The metadata of a weights file, checked: a one-line ``ValueError`` for a file that is not an .npz of
    ReDrafter weights, lacks metadata, or has keys this edgespec does not know."""
    try:
        with np.load(path) as z:
            if "meta" not in z.files:
                raise ValueError(f"{path} has no drafter metadata: not a ReDrafter weights file")
            meta = json.loads(str(z["meta"]))
    except ValueError as e:
        if "no drafter metadata" in str(e):
            raise
        raise ValueError(f"{path} is not a readable ReDrafter weights file (not an .npz archive)") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable ReDrafter weights file ({type(e).__name__})") from e
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{path} has no drafter config in its metadata")
    unknown = set(meta) - META_KEYS
    if unknown:
        raise ValueError(f"{path} has unknown metadata keys {sorted(unknown)} (made by another edgespec version?)")
    bad = set(meta["config"]) - {f.name for f in fields(ReDrafterConfig)}
    if bad:
        raise ValueError(f"{path} has unknown drafter config keys {sorted(bad)}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: weights format {meta.get('version')}, this edgespec reads {FORMAT_VERSION}")
    return meta


def file_digest(path: Path) -> str:
    """SHA-256 of a weights file's bytes (keys an adapted state to the weights it started from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(path: Path) -> tuple[ReDrafterConfig, np.ndarray, dict[str, np.ndarray]]:
    """Read and verify a weights file: (config, draft vocabulary, float32 params)."""
    if not path.exists():
        raise FileNotFoundError(f"no ReDrafter weights at {path}")
    meta = read_meta(path)
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable ReDrafter weights file: {e}") from e
    arrays.pop("meta")
    if meta.get("sha256") != _digest(arrays):
        raise ValueError(f"{path}: checksum mismatch (corrupt weights file)")
    vocab = arrays.pop("vocab")
    return ReDrafterConfig(**meta["config"]), vocab, {k: v.astype(np.float32) for k, v in arrays.items()}


def declared_bytes(path: Path) -> int:
    """Resident bytes of a loaded drafter, from its file alone: fp32 parameters and the int8 output rows (and
    their scales) of the draft vocabulary, plus ``HEAD_SLACK`` of working buffers and allocator slack."""
    with np.load(path) as z:
        cfg = json.loads(str(z["meta"]))["config"]
        n_params = sum(z[k].size for k in z.files if k not in ("meta", "vocab"))
        n_draft = z["vocab"].size
    return 4 * n_params + n_draft * (cfg["n_embd"] + 4) + HEAD_SLACK


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


# ---- the drafter -------------------------------------------------------------------------------------
class ReDrafter:
    """Drafts token trees from the target's hidden state (needs ``DraftContext.hidden``)."""

    name = "redrafter"
    needs_hidden = True
    # Gating by the controller's acceptance estimates, not per node: a beam step costs ~3-5 ms here, paid
    # on every verify by a self-gating drafter even when no node is worth verifying (measured: 0.46x of
    # plain with w=3 self-gated trees on this CPU; see docs/bench/history.md).
    self_gating = False
    max_depth = 4  # beam length L (the depths it was trained for)
    default_width = 1  # beams w: on a CPU every extra verify node costs ~0.6 of a plain step

    def __init__(self, weights: Path, target, xp=np, self_gating: bool | None = None):
        """``target``: the target's ``Backend`` (its embedding and output rows are read through it)."""
        if self_gating is not None:  # gate each draft by its calibrated path probabilities (``TreeShape.keep``)
            self.self_gating = self_gating

        self.cfg, vocab, params = load(weights)
        self.xp = xp
        self.vocab = vocab.astype(np.int64)
        self.emb, out_rows = target.tensor_rows("token_embd.weight", "output.weight")
        if (self.emb.n_rows, self.emb.n_cols) != (self.cfg.n_vocab, self.cfg.n_embd):
            raise ValueError(f"{weights.name} was trained for a target with vocab {self.cfg.n_vocab} and "
                             f"hidden size {self.cfg.n_embd}, not {self.emb.n_rows} x {self.emb.n_cols}")
        self.w_e = params["w_e"] * self.cfg.e_scale
        # the target's output rows of the draft vocabulary, for exact rescoring, computed once, 512 rows at a time
        # into a preallocated array (the load peak stays near the steady size), as int8 with a scale per row (the
        # GGUF's own rows are 4-6 bit: int8 adds ~0.4% relative error, and a drafter's scores need not be exact
        # for the output to be). Input embeddings are read per drafted token instead (one row a step: ~0.1 ms).
        n = len(self.vocab)
        self.head = np.empty((n, self.cfg.n_embd), np.int8)
        self.head_scale = np.empty(n, np.float32)
        for i in range(0, n, 512):
            out = out_rows(self.vocab[i:i + 512]).astype(np.float32)
            scale = np.maximum(np.abs(out).max(axis=1), 1e-12) / 127.0
            self.head[i:i + 512] = np.rint(out / scale[:, None]).astype(np.int8)
            self.head_scale[i:i + 512] = scale
        return_large_frees()  # the load's temporaries go back to the system
        self.draft_of = np.full(self.cfg.n_vocab, -1, np.int64)  # target id -> draft id
        self.draft_of[self.vocab] = np.arange(len(self.vocab))
        self.set_params(params)
        self.adapter = None  # an online.OnlineAdapter, when adaptation is on
        self.n_params = sum(v.size for v in params.values())
        self.calib_pred = np.ones(16)  # per depth: decayed sums of predicted path probability ...
        self.calib_hit = np.ones(16)  # ... and of paths the target accepted
        self._last: tuple[DraftTree, list[float]] | None = None

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        """Swap in new weights (from online adaptation) in one assignment each, between drafts."""
        self.p_np = params
        self.p = params if self.xp is np else {k: self.xp.array(v) for k, v in params.items()}

    # ---- beam search --------------------------------------------------------------------------
    def draft_logp(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shortlist the top-m draft tokens of each row of ``x`` with the low-rank head, rescore them with the
        target's exact output rows. Returns ([B, m] draft ids, [B, m] log-probs over the shortlist)."""
        p, m = self.p_np, min(self.cfg.shortlist, len(self.vocab))
        approx = (x @ p["head_a"]) @ p["head_b"] + p["bias"]
        short = np.argpartition(-approx, m - 1, axis=1)[:, :m]
        ids, inv = np.unique(short, return_inverse=True)
        rows = self.head_rows(ids)  # [u, n_embd]
        exact = np.take_along_axis(x @ rows.T, inv.reshape(short.shape), axis=1) + p["bias"][short]
        return short, log_softmax(exact)

    def head_rows(self, ids: np.ndarray) -> np.ndarray:
        """The target's output rows of draft tokens ``ids``, float32 [len(ids), n_embd]."""
        return self.head[ids].astype(np.float32) * self.head_scale[ids, None]

    def beams(self, hidden: np.ndarray, root: int, width: int, length: int,
              floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Beam search: ([w, L'] target token ids, [w, L'] cumulative draft log-probs). Adaptive length: it
        stops early (L' < L) once even the best beam's calibrated path probability is below ``floor``."""
        xp = self.xp
        h = hidden_part(self.p_np, (hidden.astype(np.float32) * self.cfg.h_scale)[None])
        e = self.emb([root]) @ self.w_e
        s = np.zeros((1, self.cfg.d_rnn), np.float32)
        seqs = np.zeros((1, 0), np.int64)
        cum = np.zeros((1, 0), np.float32)
        score = np.zeros(1, np.float32)
        for _ in range(length):
            if xp is np:
                s, x = step(self.p, self.cfg.n_blocks, h, e, s, np)
            else:  # MLX (Metal): the step on the device, the shortlist on the host
                s, x = step(self.p, self.cfg.n_blocks, xp.array(h), xp.array(e), xp.array(s), xp)
                s, x = np.array(s), np.array(x)
            short, logp = self.draft_logp(x)
            cand = (score[:, None] + logp).ravel()
            k = min(width, cand.size)
            top = np.argpartition(-cand, k - 1)[:k]
            top = top[np.argsort(-cand[top])]
            b = top // logp.shape[1]
            t = short.ravel()[top]
            score = cand[top]
            seqs = np.concatenate([seqs[b], t[:, None]], axis=1)
            cum = np.concatenate([cum[b], score[:, None]], axis=1)
            s, e = s[b], self.emb(self.vocab[t]) @ self.w_e
            if floor > 0 and self._calibrated(float(np.exp(score[0])), seqs.shape[1] - 1) < floor:
                break
        return self.vocab[seqs], cum

    def propose(self, ctx: DraftContext, shape: TreeShape) -> DraftTree:
        if ctx.hidden is None or shape.depth <= 0 or shape.max_nodes <= 0:
            return DraftTree()
        floor = min(shape.node_cost) if shape.node_cost else 0.0  # no node is worth less than the cheapest
        toks, cum = self.beams(ctx.hidden, ctx.root, max(shape.width, 1), shape.depth, floor)
        # every distinct prefix is a candidate node, with its calibrated path probability (never above its
        # parent's, so best-first selection always keeps parents before children)
        cands: dict[tuple[int, ...], float] = {}
        for beam, lp in zip(toks.tolist(), cum.tolist(), strict=False):
            for d in range(len(beam)):
                key = tuple(beam[:d + 1])
                prob = self._calibrated(float(np.exp(lp[d])), d)
                if d:
                    prob = min(prob, cands[key[:-1]])
                cands[key] = max(cands.get(key, 0.0), prob)
        kept: list[tuple[int, ...]] = []
        if shape.node_cost and len(toks) == 1:  # a priced chain: its prefix with the largest expected gain
            chain = [tuple(toks[0][:d + 1].tolist()) for d in range(toks.shape[1])]
            kept = chain[:shape.keep([cands[k] for k in chain])]
        else:
            for key, prob in sorted(cands.items(), key=lambda kv: (-kv[1], len(kv[0]))):
                if not shape.worth(prob, len(kept)):
                    break
                kept.append(key)
        tree, _ = pack_beams([list(k) for k in kept])
        tree.p = [cands[k] for k in _node_keys(tree)]
        self._last = (tree, tree.p)
        return tree

    def _calibrated(self, p: float, depth: int) -> float:
        d = min(depth, len(self.calib_hit) - 1)
        return min(1.0, p * self.calib_hit[d] / self.calib_pred[d])

    def observe(self, result: VerifyResult) -> None:
        if self.adapter is not None:
            self.adapter.record(result)
        if self._last is None or self._last[0] is not result.tree:
            return
        tree, probs = self._last
        accepted = set(result.accepted)
        decay = 0.98
        for i, d in enumerate(tree.depths()):
            k = min(d - 1, len(self.calib_hit) - 1)
            self.calib_pred[k] = decay * self.calib_pred[k] + probs[i]
            self.calib_hit[k] = decay * self.calib_hit[k] + (i in accepted)
        self._last = None

    def reset(self) -> None:
        self._last = None
        if self.adapter is not None:
            self.adapter.end_request()

    def footprint(self) -> dict[str, int]:
        b = 4 * self.n_params + self.head.nbytes + self.head_scale.nbytes + HEAD_SLACK
        b += self.adapter.footprint() if self.adapter else 0
        return {"now": b, "max": b}

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()


def _node_keys(tree: DraftTree) -> list[tuple[int, ...]]:
    keys: list[tuple[int, ...]] = []
    for tok, par in zip(tree.tokens, tree.parents, strict=False):
        keys.append((keys[par] if par >= 0 else ()) + (tok,))
    return keys


def shipped(target: str) -> Path | None:
    """The drafter shipped for model id ``target``, if any."""
    p = weights_path(target)
    return p if p.exists() else None


def distill_kl(torch, logq, ids: np.ndarray, top_logp: np.ndarray):
    """Per-row forward KL(target || draft): the target's top-k log-probs ``top_logp`` [B, k] at draft ids
    ``ids`` [B, k] (-1: outside the draft vocabulary), renormalized over the draft vocabulary."""
    w = np.where(ids >= 0, np.exp(top_logp.astype(np.float32)), 0.0)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-9)
    ent = np.where(w > 0, w * np.log(np.maximum(w, 1e-12)), 0.0).sum(1)
    gathered = torch.gather(logq, 1, torch.from_numpy(np.maximum(ids, 0)))
    return torch.from_numpy(ent.astype(np.float32)) - (torch.from_numpy(w.astype(np.float32)) * gathered).sum(1)
