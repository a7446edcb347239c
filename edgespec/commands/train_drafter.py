"""``edgespec train-drafter``: collect distillation data from a target (resumable), then train a ReDrafter head."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgespec import paths


def add_parser(sub) -> None:
    p = sub.add_parser("train-drafter",
                       help="collect distillation data from a target (resumable) and train a ReDrafter head")
    p.add_argument("--target", required=True, help="target model id (or .gguf path)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="draft depths trained")
    p.add_argument("--draft-vocab", type=int, default=16384, help="draft vocabulary size")
    p.add_argument("--depth-weight", type=float, default=1.0,
                   help="loss weight of depth j is DEPTH_WEIGHT ** (j - 1) (default 1: every depth alike)")
    p.add_argument("--d-rnn", type=int, default=256, help="the head's RNN state size")
    p.add_argument("--blocks", type=int, default=1, help="the head's residual blocks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--time-budget", type=float, default=None,
                   help="fit the training steps into this many seconds (measured on the first steps)")
    p.add_argument("--train-only", action="store_true",
                   help="train on the collection in --data-dir (made with --collect-only), collecting nothing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="weights file (default: the user's drafter directory)")
    p.add_argument("--collect-only", action="store_true",
                   help="only collect the distillation data (resumable: run it again to continue)")
    p.add_argument("--positions", type=int, default=None,
                   help="positions to collect (default 2000000)")
    p.add_argument("--instructions-per-shard", type=int, default=None,
                   help="instructions the target answers per shard (default 32; 0: only "
                        "teacher-forced text)")
    p.add_argument("--texts-per-shard", type=int, default=None,
                   help="teacher-forced windows per shard (default 16)")
    p.add_argument("--rows", type=int, default=None, help="rows per decode (default 64)")
    p.add_argument("--seed", type=int, default=None, help="the material's order (default 0)")
    p.add_argument("--data-dir", default=None, action="append",
                   help="collection directory (default ~/.cache/edgespec/distill/<target>-v2); with --train-only "
                        "it may be repeated to train on several collections")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from edgespec.models.training import collect
    from edgespec.models.training.train_redrafter import TrainConfig, train_collected

    # the collection's knobs: flag -> (CollectConfig field, value given)
    knobs = {"--instructions-per-shard": ("prompts_per_shard", a.instructions_per_shard),
             "--texts-per-shard": ("texts_per_shard", a.texts_per_shard), "--rows": ("rows", a.rows),
             "--seed": ("seed", a.seed)}
    given = {field: v for _, (field, v) in knobs.items() if v is not None}
    if a.train_only and (given or a.positions):
        flags = [f for f, (_, v) in knobs.items() if v is not None] + (["--positions"] if a.positions else [])
        raise ValueError(f"{', '.join(flags)} shape a collection: --train-only collects nothing")
    if a.train_only and a.collect_only:
        raise ValueError("--train-only and --collect-only exclude each other")
    data_dirs = [Path(d) for d in a.data_dir] if a.data_dir else [collect.default_dir(a.target)]
    if not a.train_only:
        if len(data_dirs) > 1:
            raise ValueError("a collection goes to one --data-dir")
        shards = collect.run(a.target, a.positions or 2_000_000, threads=a.threads, out_dir=data_dirs[0],
                             cfg=collect.CollectConfig(**given))
        print(f"{len(shards)} shards, {sum(collect.shard_positions(p) for p in shards)} positions in {data_dirs[0]}")
        if a.collect_only:
            return 0
    for d in data_dirs:
        if not list(d.glob("shard_*.npz")):
            raise ValueError(f"no collected shards in {d}: collect them first with --collect-only")
    tc = TrainConfig(steps=a.steps, batch=a.batch, n_draft=a.draft_vocab, depth=a.depth, depth_weight=a.depth_weight,
                     d_rnn=a.d_rnn, n_blocks=a.blocks, lr=a.lr, threads=a.threads, time_budget_s=a.time_budget)
    out = Path(a.out) if a.out else paths.cache_dir() / "drafters" / f"redrafter-{a.target}.npz"
    tr = train_collected(a.target, data_dirs, out, tc)
    last = next((r["held_out"] for r in reversed(tr.history) if "held_out" in r), {})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), model card {out.with_suffix('.md')}")
    print(f"held-out greedy chain acceptance per depth: {[round(x, 3) for x in last.get('chain_accept', [])]}")
    return 0
