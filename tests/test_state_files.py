"""Adapted drafter state on disk: two processes saving the same file at once leave one whole, valid state."""

import multiprocessing as mp
from pathlib import Path

import numpy as np

from edgespec.models.drafting import redrafter
from edgespec.models.drafting.redrafter import ReDrafterConfig

CFG = ReDrafterConfig(target="test", n_embd=64, n_vocab=1000, d_rnn=16, n_blocks=1, rank=8)


def params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float16) for k, s in redrafter.param_shapes(CFG, 128).items()}


def saver(path: str, seed: int, times: int, start) -> None:
    p = params(seed)
    start.wait()
    for _ in range(times):
        redrafter.save(Path(path), CFG, np.arange(128), p, base=f"writer-{seed}")


def test_two_processes_saving_at_once_leave_one_valid_state(tmp_path):
    path = tmp_path / "state.npz"
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=saver, args=(str(path), seed, 25, start)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cfg, vocab, got = redrafter.load(path)  # checks the arrays' SHA-256 against the metadata
    writer = redrafter.read_meta(path)["base"]
    want = params(int(writer.split("-")[1]))
    assert cfg == CFG and list(vocab) == list(range(128))
    assert all(np.array_equal(got[k], want[k]) for k in want)  # one writer's state, whole, not a mix
    assert sorted(f.name for f in tmp_path.iterdir()) == ["state.npz"]  # no temporary file left behind
