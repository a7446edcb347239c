"""Train a ReDrafter head by distillation from the target (``edgespec train-drafter``), in torch on the CPU.

Why torch: MLX's Linux CPU build multiplies matrices without a fast BLAS (one AdamW step of a 70M head
took 45-49 s, notes §2); torch's CPU build does the same step in well under a second here. The model
itself is ``redrafter.step``, shared with the numpy and MLX inference paths.

Data (``collect.py`` shards): at position t the head sees the target's hidden
h_t and the tokens x_{t+1..t+L}; at depth j it predicts the target's distribution at position t+j. Loss: forward
KL to the target's top-k distribution restricted to the draft vocabulary (distillation), each row weighted by
its segment's weight (v2: the target's own answers 1.0, teacher-forced text and prompts less) and depth j by
``depth_weight ** (j - 1)`` (a miss at depth 1 ends the chain, so the first depths matter most). Reported too:
the hard cross-entropy against the text's next token, and per-depth agreement with the target's argmax.
Checkpoints every ``ckpt_every`` steps; a run resumes from the last one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgespec.backends.base import usable_cpus
from edgespec.models.drafting import redrafter
from edgespec.models.drafting.redrafter import ReDrafterConfig, distill_kl


@dataclass
class TrainConfig:
    depth: int = 4  # draft depths trained (L)
    n_draft: int = 16384  # draft vocabulary size
    d_rnn: int = 256
    n_blocks: int = 1
    rank: int = 128
    shortlist: int = 64
    steps: int = 1200
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    depth_weight: float = 1.0  # loss weight of depth j: depth_weight ** (j - 1)
    ckpt_every: int = 100
    eval_every: int = 200
    seed: int = 0
    threads: int | None = None  # torch CPU threads (default: all cores, at most 4)
    time_budget_s: float | None = None  # cap the steps to what fits this wall time (measured on the first 10)
    bf16: bool | None = None  # bf16 autocast of the matmuls (None: where the CPU has AMX, bf16 matmuls run ~7x
    # faster there: 1,632 vs 227 GFLOP/s for the head's [256, 1536] x [1536, 16384] on 2 Xeon cores)


@dataclass
class Data:
    tokens: np.ndarray  # [N, T] int32, -1 = padding
    hidden: np.ndarray  # [N, T, d] float16
    top_ids: np.ndarray  # [N, T, k] int32
    top_logp: np.ndarray  # [N, T, k] float16
    weight: np.ndarray | None = None  # [N] per-segment loss weight (None: all 1)
    source: np.ndarray | None = None  # [N] source kind (``collect.SOURCES``)
    item: np.ndarray | None = None  # [N] item within its shard

    @classmethod
    def load(cls, paths: list[Path]) -> Data:
        from edgespec.models.training.collect import DATA_KEYS, load_shards

        return cls(**load_shards(paths, DATA_KEYS + ("weight", "source", "item")))

    def subset(self, segments: np.ndarray) -> Data:
        """The segments selected by a boolean mask (or index array)."""
        return Data(**{k: None if v is None else v[segments] for k, v in self.__dict__.items()})

    def weights(self, seg: np.ndarray) -> np.ndarray:
        return np.ones(len(seg), np.float32) if self.weight is None else self.weight[seg].astype(np.float32)

    def positions(self, depth: int) -> np.ndarray:
        """(segment, t) pairs whose tokens t+1 .. t+depth+1 exist."""
        valid = np.zeros(self.tokens.shape, bool)
        n = self.tokens.shape[1]
        valid[:, :n - depth - 1] = self.tokens[:, depth + 1:] >= 0
        return np.argwhere(valid)


def amx_available() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles (x86 ``amx_bf16``)."""
    from edgespec import machine

    return "amx_bf16" in machine.simd_flags()


def draft_vocab(data: Data, n: int) -> np.ndarray:
    """The ``n`` most frequent target tokens in the text and in the target's top-1 predictions."""
    counts = np.bincount(data.tokens[data.tokens >= 0].ravel(), minlength=1)
    top1 = np.bincount(data.top_ids[..., 0][data.tokens >= 0].ravel(), minlength=len(counts))
    m = max(len(counts), len(top1))
    total = np.pad(counts, (0, m - len(counts))) + np.pad(top1, (0, m - len(top1)))
    order = np.argsort(-total, kind="stable")[:n]
    return np.sort(order[total[order] > 0]).astype(np.int32)


def init_params(cfg: ReDrafterConfig, n_draft: int, seed: int) -> dict[str, np.ndarray]:
    """Random RNN and small residual blocks; x starts as the target hidden itself, so the shared head
    starts from the target's own next-token prediction."""
    rng = np.random.default_rng(seed)
    shapes = redrafter.param_shapes(cfg, n_draft)
    p = {k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) if len(s) == 2 else np.zeros(s, np.float32)
         for k, s in shapes.items()}
    p["w_h"] = np.eye(cfg.n_embd, dtype=np.float32) / cfg.h_scale
    p["w_s"] *= 0.1
    for k in range(cfg.n_blocks):
        p[f"w{k}"] *= 0.1
    return p


def shortlist_factors(head: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """Rank-r SVD factors of the output rows [V_d, d]: x @ head_a @ head_b approximates x @ head.T."""
    u, sv, vt = np.linalg.svd(head.astype(np.float32), full_matrices=False)
    return {"head_a": (vt[:rank].T * np.sqrt(sv[:rank])).astype(np.float32),
            "head_b": (u[:, :rank] * np.sqrt(sv[:rank])).T.astype(np.float32)}


class Trainer:
    def __init__(self, data: Data, held: Data, target_gguf: Path, target: str, out_dir: Path, tc: TrainConfig):
        import torch

        from edgespec.backends.gguf_file import TensorRows

        torch.manual_seed(tc.seed)
        torch.set_num_threads(tc.threads or min(4, usable_cpus()))
        self.torch, self.tc, self.out_dir, self.data, self.held = torch, tc, out_dir, data, held
        self.bf16 = amx_available() if tc.bf16 is None else tc.bf16
        out_dir.mkdir(parents=True, exist_ok=True)
        d = data.hidden.shape[-1]
        emb_rows = TensorRows(target_gguf, "token_embd.weight")
        h_rms = float(np.sqrt(np.mean(data.hidden[:4].astype(np.float32) ** 2)))
        self.vocab = draft_vocab(data, tc.n_draft)
        # every token the model may read as input, in one compact table
        used = np.unique(np.concatenate([data.tokens[data.tokens >= 0], held.tokens[held.tokens >= 0]]))
        self.row_of = np.full(emb_rows.n_rows, -1, np.int64)
        self.row_of[used] = np.arange(len(used))
        emb = emb_rows(used)
        e_rms = float(np.sqrt(np.mean(emb ** 2)))
        self.cfg = ReDrafterConfig(target, d, emb_rows.n_rows, tc.d_rnn, tc.n_blocks, tc.rank, tc.shortlist,
                                   h_scale=1.0 / h_rms, e_scale=1.0 / e_rms)
        self.emb = torch.from_numpy(emb * self.cfg.e_scale)
        self.draft_of = np.full(emb_rows.n_rows, -1, np.int64)  # target id -> draft id
        self.draft_of[self.vocab] = np.arange(len(self.vocab))
        self.head = torch.from_numpy(TensorRows(target_gguf, "output.weight")(self.vocab))  # frozen, shared
        init = init_params(self.cfg, len(self.vocab), tc.seed)
        self.params = {k: torch.nn.Parameter(torch.from_numpy(v)) for k, v in init.items()}
        self.opt = torch.optim.AdamW(self.params.values(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * min(s, tc.steps) / tc.steps)))
        self.pos = data.positions(tc.depth)
        self.held_pos = held.positions(tc.depth)
        self.rng = np.random.default_rng(tc.seed)
        self.step_n = 0
        self.history: list[dict] = []
        self._resume()

    # ---- checkpoints --------------------------------------------------------------------------
    def _ckpt(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _resume(self) -> None:
        if self._ckpt().exists():
            st = self.torch.load(self._ckpt(), weights_only=False)
            for k, v in st["params"].items():
                self.params[k].data.copy_(v)
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            self.step_n, self.history = st["step"], st["history"]
            self.rng = np.random.default_rng([self.tc.seed, self.step_n])

    def save_checkpoint(self) -> None:
        tmp = self._ckpt().with_suffix(".tmp")
        self.torch.save({"params": {k: v.data for k, v in self.params.items()}, "opt": self.opt.state_dict(),
                         "sched": self.sched.state_dict(), "step": self.step_n, "history": self.history}, tmp)
        tmp.replace(self._ckpt())

    # ---- the loss -----------------------------------------------------------------------------
    def batch_losses(self, data: Data, pos: np.ndarray) -> dict:
        """Distillation KL, hard CE and argmax agreement per depth for (segment, t) pairs ``pos``."""
        torch = self.torch
        seg, t = pos[:, 0], pos[:, 1]
        p = self.params
        h = redrafter.hidden_part(p, torch.from_numpy(data.hidden[seg, t].astype(np.float32) * self.cfg.h_scale))
        s = torch.zeros(len(pos), self.cfg.d_rnn)
        kl, ce, agree = [], [], []
        w = torch.from_numpy(data.weights(seg))
        w = w / w.sum()
        for j in range(1, self.tc.depth + 1):
            x_in = data.tokens[seg, t + j]
            e_proj = self.emb[self.row_of[x_in]] @ p["w_e"]
            s, x = redrafter.step(p, self.cfg.n_blocks, h, e_proj, s, torch)
            logits = x @ self.head.T + p["bias"]
            logq = torch.log_softmax(logits, dim=-1)
            ids = self.draft_of[data.top_ids[seg, t + j]]  # [B, k] draft ids, -1 = outside
            kl.append((w * distill_kl(torch, logq, ids, data.top_logp[seg, t + j])).sum())
            nxt = self.draft_of[data.tokens[seg, t + j + 1]]
            ok = nxt >= 0
            ce.append(-logq[torch.from_numpy(np.flatnonzero(ok)), torch.from_numpy(nxt[ok])].mean())
            pred = logq.argmax(1).numpy()
            agree.append(float(np.mean(self.vocab[pred] == data.top_ids[seg, t + j, 0])))
        return {"kl": kl, "ce": ce, "agree": agree}

    def train(self, steps: int | None = None, progress: bool = True) -> list[dict]:
        steps = self.tc.steps if steps is None else steps
        bar = tqdm(total=steps, initial=min(self.step_n, steps), desc="train", unit="step", disable=not progress)
        t0, n0 = time.perf_counter(), self.step_n
        while self.step_n < steps:
            if self.tc.time_budget_s and self.step_n == n0 + 10:  # fit the schedule to the time budget
                per = (time.perf_counter() - t0) / 10
                steps = self.tc.steps = min(steps, n0 + 10 + int((self.tc.time_budget_s - 10 * per) / per))
                bar.total = steps
            idx = self.rng.integers(0, len(self.pos), self.tc.batch)
            with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16):
                out = self.batch_losses(self.data, self.pos[idx])
            dw = [self.tc.depth_weight ** j for j in range(len(out["kl"]))]
            loss = sum(k * x for k, x in zip(out["kl"], dw, strict=True)) / sum(dw)
            self.opt.zero_grad()
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
            self.opt.step()
            self.sched.step()
            self.step_n += 1
            ce = float(sum(out["ce"]).detach()) / len(out["ce"])
            rec = {"step": self.step_n, "kl": float(loss.detach()), "ce": ce, "agree": out["agree"]}
            if self.step_n % self.tc.eval_every == 0 or self.step_n == steps:
                rec["held_out"] = self.evaluate()
            self.history.append(rec)
            bar.set_postfix(kl=f"{rec['kl']:.3f}", a1=f"{out['agree'][0]:.2f}")
            bar.update(1)
            if self.step_n % self.tc.ckpt_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return self.history

    def evaluate(self, n: int = 1024) -> dict:
        """Held-out: KL, CE, per-depth argmax agreement, and greedy chain acceptance per depth (over
        positions where the text itself is the target's greedy path, so the chain is what decoding sees)."""
        with self.torch.no_grad():
            pos = self.held_pos[np.random.default_rng(1).permutation(len(self.held_pos))[:n]]
            out = self.batch_losses(self.held, pos)
            seg, t = pos[:, 0], pos[:, 1]
            greedy = self.held.tokens[seg, t + 1] == self.held.top_ids[seg, t, 0]  # the root is greedy
            hit = np.ones(len(pos), bool)
            kinds = self._kinds(seg)
            chain: list[float] = []
            by_kind: dict[str, list[float]] = {str(k): [] for k in sorted(set(kinds))}
            for j in range(1, self.tc.depth + 1):
                if j > 1:  # draft inputs x_{t+1..t+j} all on the target's greedy path
                    greedy &= self.held.tokens[seg, t + j] == self.held.top_ids[seg, t + j - 1, 0]
                hit &= self._agree_mask(pos, j)
                chain.append(float(hit[greedy].mean()) if greedy.any() else 0.0)
                for k, acc in by_kind.items():
                    m = greedy & (kinds == k)
                    acc.append(float(hit[m].mean()) if m.any() else 0.0)
        out = {"kl": float(sum(out["kl"]) / len(out["kl"])), "ce": float(sum(out["ce"]) / len(out["ce"])),
               "agree": out["agree"], "chain_accept": chain}
        if len(by_kind) > 1:
            out["chain_accept_by_kind"] = by_kind
        return out

    def _kinds(self, seg: np.ndarray) -> np.ndarray:
        """Each position's kind of text: "answer" (the target's own), "text" (teacher-forced code and docs),
        or "prompt"."""
        from edgespec.models.training.collect import SOURCES, TEXT_KINDS

        names = np.array([SOURCES[k] for k in self.held.source[seg]])
        return np.where(np.isin(names, TEXT_KINDS), "text", np.where(names == "prompt", names, "answer"))

    def _agree_mask(self, pos: np.ndarray, depth: int) -> np.ndarray:
        torch = self.torch
        seg, t = pos[:, 0], pos[:, 1]
        h = redrafter.hidden_part(self.params, torch.from_numpy(self.held.hidden[seg, t].astype(np.float32)
                                                                * self.cfg.h_scale))
        s = torch.zeros(len(pos), self.cfg.d_rnn)
        for j in range(1, depth + 1):
            e_proj = self.emb[self.row_of[self.held.tokens[seg, t + j]]] @ self.params["w_e"]
            s, x = redrafter.step(self.params, self.cfg.n_blocks, h, e_proj, s, torch)
        logits = x @ self.head.T + self.params["bias"]
        pred = self.vocab[logits.argmax(1).numpy()]
        return pred == self.held.top_ids[seg, t + depth, 0]

    def export(self, path: Path) -> None:
        params = {k: v.detach().numpy() for k, v in self.params.items()}
        params.update(shortlist_factors(self.head.numpy(), self.cfg.rank))
        redrafter.save(path, self.cfg, self.vocab, params)


def write_card(path: Path, trainer: Trainer, meta: dict) -> None:
    """Loss curve PNG and a markdown model card next to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = trainer.history
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in h]
    ax.plot(steps, [r["kl"] for r in h], label="train KL (distillation)", alpha=0.7)
    ax.plot(steps, [r["ce"] for r in h], label="train CE (next text token)", alpha=0.7)
    ev = [r for r in h if "held_out" in r]
    ax.plot([r["step"] for r in ev], [r["held_out"]["kl"] for r in ev], "o-", label="held-out KL")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"ReDrafter for {trainer.cfg.target}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".loss.png"), dpi=110)
    plt.close(fig)
    last = ev[-1]["held_out"] if ev else {}
    card = [f"# ReDrafter head for `{trainer.cfg.target}`", "",
            f"- Size on disk: {path.stat().st_size / 1e6:.1f} MB (fp16); trained parameters: "
            f"{sum(v.numel() for v in trainer.params.values()) / 1e6:.2f}M",
            f"- Config: `{json.dumps(asdict(trainer.cfg))}`",
            f"- Training: `{json.dumps(asdict(trainer.tc))}`; matmuls in {'bf16' if trainer.bf16 else 'fp32'}",
            f"- Data: {meta['data']}" if "data" in meta else
            f"- Data: {meta.get('segments')} segments x {meta.get('seg_len')} tokens "
            f"({meta.get('tokens')} positions; {meta.get('self_segments', 0)} of them the target's own greedy answers);"
            " sources: Python standard library and installed packages' sources (HumanEval excluded)",
            f"- Steps: {trainer.step_n}, batch {trainer.tc.batch}; wall time {meta.get('train_s', 0):.0f} s"
            + (f" on {meta['machine']}, {trainer.torch.get_num_threads()} torch threads" if "machine" in meta else ""),
            f"- Final train KL {h[-1]['kl']:.3f}, CE {h[-1]['ce']:.3f}" if h else "- not trained",
            f"- Held-out: KL {last.get('kl', float('nan')):.3f}, CE {last.get('ce', float('nan')):.3f}",
            f"- Held-out argmax agreement per depth: {[round(a, 3) for a in last.get('agree', [])]}",
            f"- Held-out greedy chain acceptance per depth: {[round(a, 3) for a in last.get('chain_accept', [])]}",
            *[f"  - {kind}: {[round(a, 3) for a in acc]}"
              for kind, acc in last.get("chain_accept_by_kind", {}).items()],
            "", f"![loss]({path.with_suffix('.loss.png').name})", ""]
    path.with_suffix(".md").write_text("\n".join(card))


def fit(target: str, target_gguf: Path, train: Data, held: Data, out: Path, tc: TrainConfig, meta: dict) -> Trainer:
    """Train (resuming from the work folder beside ``out``), export the weights and write the model card."""
    work = out.parent / f".{out.stem}.work"
    t0 = time.perf_counter()
    tr = Trainer(train, held, target_gguf, target, work, tc)
    tr.train()
    meta = {**meta, "train_s": time.perf_counter() - t0, "tokens": int((train.tokens >= 0).sum())}
    tr.export(out)
    write_card(out, tr, meta)
    return tr


HELD_OUT_EVERY = 16  # v2: items (an instruction with its answer, or a text window) held out: 1 in 16


def train_collected(target: str, data_dirs: list[Path], out: Path, tc: TrainConfig,
                    held_every: int = HELD_OUT_EVERY) -> Trainer:
    """``edgespec train-drafter --train-only``: train on every complete shard of the v2 collections
    (``collect.py``) in ``data_dirs`` and export to ``out``. Held out by item, not by position: every 16th
    (``held_every``) item of each shard (an instruction's prompt and answer together, or a whole text window),
    so both the target's answers and teacher-forced text are evaluated on material never trained on."""
    from edgespec import machine, registry
    from edgespec.models.training import collect

    shards = [p for d in data_dirs for p in sorted(d.glob("shard_*.npz"))]
    comp: dict[str, int] = {}
    for p in shards:
        for kind, n in collect.composition(p).items():
            comp[kind] = comp.get(kind, 0) + n
    total = sum(comp.values())
    meta = {"data": f"{total} positions in {len(shards)} v2 shards of " + ", ".join(f"`{d.name}`" for d in data_dirs)
                    + " (" + ", ".join(f"{k} {v}" for k, v in sorted(comp.items())) + "): the target's greedy answers "
                    "to instructions built from the Python standard library and installed packages, their prompts, "
                    f"and teacher-forced source and documentation windows (no benchmark prompt; `corpus.py`); 1 item "
                    f"in {held_every} held out",
            "machine": machine.cpu_name()}
    data = Data.load(shards)
    held = data.item % held_every == held_every - 1
    return fit(registry.model_key(target), registry.resolve(target), data.subset(~held), data.subset(held), out, tc,
               meta)
