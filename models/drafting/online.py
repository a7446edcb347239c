"""Online adaptation of a ReDrafter head on the user's own traffic (in the spirit of OSD, 2310.07177).

Every verify tells what the target wanted at each position it committed (the root and the accepted
nodes): its logits row there, and the hidden state that produced the position's token. ``record`` pushes
each such position; an example is a position's producing hidden state, the next ``depth`` tokens of the
target's own text and the target's top-k after each (teacher forcing, as in offline distillation). The
rejections are in it: the position after the last accepted node carries the target's correction, and the
example starting there runs on past the point the draft failed. ``adapt`` takes a few AdamW steps of the
distillation loss (forward KL, ``redrafter.distill_kl``, depth j weighted ``depth_weight ** j``) on
the buffer and swaps the new weights into the drafter.

What is trained (``TRAINED``): the RNN recurrence, the state-to-x projection, the residual blocks, the
output bias (the domain's token prior, at ``bias_lr`` times the rate) and the shortlist factor ``head_b``;
the input projections, ``head_a`` and the shared output rows stay frozen. The loss scores tokens the way
the drafter does when it drafts: with the target's exact output rows (already resident in the drafter),
over the target's top-k and the drafter's own shortlist, so no vocabulary-sized matrix of rows is built.
The shortlist factors get a loss of their own (KL over the whole draft vocabulary through the rank-r
factors, its input detached), so that the target's choices rank into the shortlist that gets exact
scores. Its memory (parameters, gradients, two AdamW moments, the buffer, one step's activations) is
declared by ``footprint`` and counted by the planner. What each choice measured is in docs/bench/history.md
(online adaptation): training the rest through the low-rank factors lowered acceptance; one example per
verify cut at the first rejection gave less than half the gain.

Never in the user's way: ``update`` is a job of short steps that the core's background worker
(``edgespec.background``) runs only while no request decodes in the process, at the lowest OS priority.
State persists per user and target (``state_path``): written atomically (temporary file, fsync,
rename) with a format version and a SHA-256, so a crash mid-save leaves the previous state loadable.
``edgespec drafter reset`` deletes it; ``enabled=False`` turns adaptation off.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgespec.memory.live import return_large_frees
from edgespec.models.drafting import redrafter
from edgespec.models.drafting.drafter import VerifyResult

TRAINED = ("u", "b_s", "w_s", "b_x", "w0", "b0", "bias", "head_b")


@dataclass
class OnlineConfig:
    enabled: bool = True
    capacity: int = 2048  # examples kept (oldest dropped)
    top_k: int = 8
    min_new: int = 32  # new examples before an update
    steps: int = 16  # AdamW steps per update
    batch: int = 64
    lr: float = 5e-4
    negatives: int = 64  # the drafter's own top guesses scored next to the target's top-k (its shortlist size)
    depth_weight: float = 0.6  # loss weight of depth j is depth_weight ** j (a miss at depth 1 ends the chain)
    bias_lr: float = 30.0  # the output bias (the domain's token prior) learns at bias_lr * lr
    seed: int = 0
    shortlist_loss: float = 0.3  # weight of the shortlist factors' own loss (which tokens get exact scores)
    save_every_s: float = 300.0  # the adapted state is written at most this often, and at ``close``


def state_path(root: Path, target: str) -> Path:
    return root / "adapted" / f"redrafter-{target}.npz"


# The trainer's own resident set: importing torch 2.13 (CPU) and what its first AdamW step initializes once
# (kernels, thread pool). Measured on this machine in a fresh python 3 with numpy and edgespec imported:
# RSS (/proc/self/statm) +183.6 MiB across `import torch`, then +85.8 MiB across one AdamW step of a 64x64
# parameter in a background thread (as ``start`` runs it); 269.4 MiB in all, the same in two runs.
TRAINER_RUNTIME_BYTES = 270 << 20


def declared_parts(weights: Path, cfg: OnlineConfig | None = None) -> dict[str, int]:
    """What adaptation of the head in ``weights`` will hold (``OnlineAdapter.footprint``), from the file alone."""
    cfg = cfg or OnlineConfig()
    with np.load(weights) as z:
        import json

        n_embd = json.loads(str(z["meta"]))["config"]["n_embd"]
        trained = sum(z[k].size for k in TRAINED if k in z.files)
        n_draft = z["vocab"].size
    return _parts(cfg, n_embd, trained, n_draft, depth=4)


def declared_bytes(weights: Path, cfg: OnlineConfig | None = None) -> int:
    return sum(declared_parts(weights, cfg).values())


def _parts(cfg: OnlineConfig, n_embd: int, trained: int, n_draft: int, depth: int) -> dict[str, int]:
    """The trainer's runtime; the state kept between updates (the example buffer, and the trained part's
    fp32 copy, gradients and two AdamW moments); one step's working set, per depth: the fp32 output rows of
    the candidate set (at most batch x (top-k + negatives) rows) and its scores, kept for the backward pass,
    the shortlist loss's draft-vocabulary scores and their log-softmax, and one fp16 gather of the rows.
    Measured with the qwen2.5-coder-1.5b head (16 background updates of 16 steps on a full buffer): RSS
    peaked 449 MiB above the loaded head (2835 candidate rows at most) against 494 MiB declared here (the
    bound for all 4608 candidates distinct), and settled at 350-355 MiB between updates."""
    cand = cfg.batch * (cfg.top_k + cfg.negatives)
    buf = cfg.capacity * (2 * n_embd + 8 * depth + depth * cfg.top_k * (8 + 4))
    step = depth * (cand * n_embd * 4 + 2 * cfg.batch * cand * 4 + 2 * cfg.batch * n_draft * 4) + cand * n_embd * 2
    return {"adapt_trainer": TRAINER_RUNTIME_BYTES, "adapt_state": 4 * 4 * trained + buf, "adapt_step": step}


class OnlineAdapter:
    def __init__(self, drafter, cfg: OnlineConfig | None = None, path: Path | None = None, base: str | None = None):
        self.d = drafter
        self.cfg = cfg or OnlineConfig()
        self.path = path
        self.base = base  # digest of the weights this state is adapted from
        self._saved_at = time.monotonic()
        self._dirty = False
        self.depth = 4
        n, k, L = self.cfg.capacity, self.cfg.top_k, self.depth
        self.h = np.zeros((n, drafter.cfg.n_embd), np.float16)
        self.tokens = np.full((n, L), -1, np.int64)  # inputs r, a_1, .. per depth
        self.top_ids = np.zeros((n, L, k), np.int64)
        self.top_logp = np.full((n, L, k), -np.inf, np.float32)
        self.n = 0  # examples recorded in total
        self.new = 0  # since the last update
        self.updates = 0
        self._lock = threading.Lock()
        self._p: dict | None = None
        self._opt = None
        self._seq: list[tuple] = []  # this request's last positions, waiting for the ones after them

    # ---- recording ----------------------------------------------------------------------------
    def record(self, result: VerifyResult) -> None:
        """Push every position this verify committed (the root and the accepted nodes): the hidden that
        produced its token, the token, and the target's top-k for the token after it."""
        if not self.cfg.enabled or result.logits is None or result.hidden is None:
            return
        tree, acc = result.tree, result.accepted
        rows = [0] + [i + 1 for i in acc]  # logits rows of the root and the accepted nodes
        toks = [result.root] + [tree.tokens[i] for i in acc]
        k = self.cfg.top_k
        for j, (row, tok) in enumerate(zip(rows, toks, strict=True)):
            h = result.root_hidden if j == 0 else result.hidden[rows[j - 1]]
            if h is not None:
                lg = result.logits[row]
                ids = np.argpartition(-lg, k)[:k]
                mx = lg.max()
                self.push(h, tok, ids, lg[ids] - (mx + np.log(np.exp(lg - mx).sum())))

    def push(self, hidden: np.ndarray, token: int, top_ids: np.ndarray, top_logp: np.ndarray) -> None:
        """Add one generated position. An example is the hidden that produced a position's token and the next
        ``depth`` positions (inputs and the target's top-k after each): teacher-forced on the target's own
        text, as in offline distillation. It is stored once those positions are known (or the request ends)."""
        with self._lock:
            self._seq.append((hidden, token, top_ids, top_logp))
            self.new += 1
            if len(self._seq) == self.depth:
                self._store(self._seq)
                self._seq.pop(0)

    def end_request(self) -> None:
        """Store the examples still waiting for positions (their chains end with the request)."""
        with self._lock:
            while self._seq:
                self._store(self._seq)
                self._seq.pop(0)

    def _store(self, seq: list) -> None:
        i = self.n % self.cfg.capacity
        m = min(len(seq), self.depth)
        self.h[i] = seq[0][0]
        self.tokens[i] = -1
        self.top_logp[i] = -np.inf
        for j in range(m):
            self.tokens[i, j] = seq[j][1]
            self.top_ids[i, j], self.top_logp[i, j] = seq[j][2], seq[j][3]
        self.n += 1

    # ---- training -----------------------------------------------------------------------------
    def pending(self) -> bool:
        return self.cfg.enabled and self.new >= self.cfg.min_new

    def adapt(self) -> int:
        """Run a whole update now, in the calling thread (benches, tests). Returns the steps taken."""
        return sum(1 for _ in self.update())

    def update(self) -> Iterator[None]:
        """One update as short steps: each ``next()`` takes one AdamW step (a few ms at the default batch), so
        the background worker can stop between any two. The new weights are swapped into the drafter after the
        last step; an update that is dropped part-way leaves the drafter's weights as they were."""
        return_large_frees()  # the training steps' large temporaries go back to the system (see footprint)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no OpenMP worker spinning between steps
        import torch


        torch.set_num_threads(1)  # the step runs on the calling thread: no pool competes with llama.cpp
        self.end_request()
        d, cfg = self.d, self.cfg
        if self._p is None:  # the trainable copy and its optimizer live across updates
            self._p = {k: torch.from_numpy(v.copy() if k in TRAINED else v) for k, v in d.p_np.items()}
            groups = [{"params": [self._p[k].requires_grad_()], "lr": cfg.lr * (cfg.bias_lr if k == "bias" else 1.0)}
                      for k in TRAINED if k in self._p]
            self._opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
        p = self._p
        rng = np.random.default_rng([cfg.seed, self.updates])
        for _ in range(cfg.steps):
            with self._lock:
                idx = rng.integers(0, min(self.n, cfg.capacity), cfg.batch)
                h, toks = self.h[idx].astype(np.float32), self.tokens[idx]
                ids, lp = self.top_ids[idx], self.top_logp[idx]
            loss = self._loss(torch, p, h, toks, ids, lp)
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            yield
        new = {k: (v.detach().numpy().copy() if k in TRAINED else d.p_np[k]) for k, v in p.items()}
        d.set_params(new)
        self.updates += 1
        self.new = 0
        self._dirty = True
        if time.monotonic() - self._saved_at >= self.cfg.save_every_s:
            self.save()

    def _loss(self, torch, p, h, toks, ids, lp):
        d = self.d
        hx = redrafter.hidden_part(p, torch.from_numpy(h * d.cfg.h_scale))
        s = torch.zeros(len(h), d.cfg.d_rnn)
        total, count = 0.0, 0
        rows = np.arange(len(h))  # examples whose chain reaches this depth (a chain that ends stays ended)
        for j in range(self.depth):
            keep = toks[rows, j] >= 0
            if not keep.any():
                break
            sel = torch.from_numpy(np.flatnonzero(keep))
            rows, hx, s = rows[keep], hx[sel], s[sel]
            e = torch.from_numpy(d.emb(toks[rows, j]) @ d.w_e)
            s, x = redrafter.step(p, d.cfg.n_blocks, hx, e, s, torch)
            logq, cols = self._scores(torch, p, x, d.draft_of[ids[rows, j]])
            w = self.cfg.depth_weight ** j
            total = total + w * redrafter.distill_kl(torch, logq, cols, lp[rows, j]).sum()
            # the shortlist factors learn on their own (x and the bias detached): to rank the target's choices
            # into the top-m that get exact scores, over the whole draft vocabulary (rank r: cheap)
            approx = (x.detach() @ p["head_a"]) @ p["head_b"] + p["bias"].detach()
            kl_short = redrafter.distill_kl(torch, torch.log_softmax(approx, -1), d.draft_of[ids[rows, j]],
                                            lp[rows, j])
            total = total + self.cfg.shortlist_loss * w * kl_short.sum()
            count += len(rows)
        return total / max(count, 1)

    def _scores(self, torch, p, x, want: np.ndarray):
        """Draft log-probs as the drafter scores them when it drafts: the target's exact output rows over a
        candidate set, here the target's top-k (``want``, draft ids, -1 outside) and the drafter's own current
        shortlist (its likeliest wrong guesses). Returns ([B, |C|] log-probs, ``want`` as columns of C)."""
        d = self.d
        with torch.no_grad():
            approx = (x @ p["head_a"]) @ p["head_b"] + p["bias"]
            mine = torch.topk(approx, min(self.cfg.negatives, approx.shape[1]), dim=1).indices.numpy()
        cand = np.unique(np.concatenate([want[want >= 0], mine.ravel()]))
        rows = torch.from_numpy(d.head_rows(cand))
        logq = torch.log_softmax(x @ rows.T + p["bias"][torch.from_numpy(cand)], dim=-1)
        cols = np.where(want >= 0, np.searchsorted(cand, np.maximum(want, 0)), -1)
        return logq, cols

    # ---- persistence -----------------------------------------------------------------------------
    def close(self) -> None:
        """Write the state if it changed since the last save (the runtime first stops a running update)."""
        if self._dirty:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            redrafter.save(self.path, self.d.cfg, self.d.vocab, self.d.p_np, base=self.base)
        self._saved_at, self._dirty = time.monotonic(), False

    def footprint(self) -> int:
        """Bytes for the trainer, the buffer, the trained part's parameters, gradients and AdamW moments and
        one step's working set (``_parts``)."""
        trained = sum(self.d.p_np[k].size for k in TRAINED if k in self.d.p_np)
        return sum(_parts(self.cfg, self.d.cfg.n_embd, trained, len(self.d.vocab), self.depth).values())
