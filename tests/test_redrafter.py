"""ReDrafter: distillation data, training, beam-to-tree packing, losslessness, shipped weights, bad files.

The mechanism is tested on smollm2-135m, the smallest model, with a tiny head trained here on the session's tiny
collection (conftest ``smol_shards``, shared with test_distill); the weights shipped for qwen2.5-coder-0.5b are
tested on that model."""

import numpy as np
import pytest
from conftest import SMALL

from edgespec.backends.gguf_file import GgufFile
from edgespec.controller import controller_for
from edgespec.generate import GenerationConfig, Stats, plain_steps, stream
from edgespec.models.drafting import redrafter
from edgespec.models.drafting.drafter import DraftContext, TreeShape
from edgespec.models.drafting.redrafter import ReDrafter
from edgespec.models.training.train_redrafter import Data, TrainConfig, Trainer
from edgespec.speculative import speculative_steps

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "import os\n\n\ndef list_python_files(root):\n"]
TINY = TrainConfig(depth=2, n_draft=512, d_rnn=32, n_blocks=1, rank=32, shortlist=16, steps=40, batch=32, lr=3e-3,
                   ckpt_every=20, eval_every=1000)


@pytest.fixture(scope="module")
def tiny_data(smol_shards):
    """At least two tiny shards from the real smollm2-135m (conftest, collected once for the session): its own
    answers, their prompts and teacher-forced text."""
    return smol_shards.paths


@pytest.fixture(scope="module")
def tiny_drafter(smol_path, tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    tr = Trainer(Data.load(tiny_data[:1]), Data.load(tiny_data[1:]), smol_path, SMALL, work, TINY)
    fixed = tr.pos[np.random.default_rng(0).permutation(len(tr.pos))[:64]]
    with tr.torch.no_grad():
        before = float(sum(tr.batch_losses(tr.data, fixed)["kl"]))
    tr.train(progress=False)
    with tr.torch.no_grad():
        after = float(sum(tr.batch_losses(tr.data, fixed)["kl"]))
    path = work / "rd.npz"
    tr.export(path)
    return {"path": path, "before": before, "after": after, "work": work, "trainer": tr}


def test_collected_data_is_the_targets(smol, tiny_data):
    d = Data.load(tiny_data)
    assert d.hidden.shape[-1] == smol.info.n_embd and d.top_ids.shape[-1] == 8
    seg = [int(t) for t in d.tokens[0] if t >= 0]
    smol.truncate(0)
    out = smol.prefill(seg[:10])
    smol.truncate(0)
    assert int(np.argmax(out.logits[0])) == int(d.top_ids[0, 9, 0])  # top-1 at position 9 is the target's argmax
    probs = np.exp(d.top_logp.astype(np.float32)).sum(-1)[d.tokens >= 0]  # padding excluded
    assert np.all(probs <= 1.01) and np.median(probs) > 0.5  # true log-probs, not renormalized


def test_training_lowers_the_loss_and_resumes(tiny_drafter, tiny_data, smol_path):
    assert tiny_drafter["after"] < 0.8 * tiny_drafter["before"]
    tr = Trainer(Data.load(tiny_data[:1]), Data.load(tiny_data[1:]), smol_path, SMALL, tiny_drafter["work"], TINY)
    assert tr.step_n == TINY.steps  # picked up the checkpoint
    saved, trained = tr.params["bias"].detach().numpy(), tiny_drafter["trainer"].params["bias"].detach().numpy()
    np.testing.assert_allclose(saved, trained)


def test_beams_pack_into_a_deduplicated_gated_tree(tiny_drafter, smol_path):
    rd = ReDrafter(tiny_drafter["path"], GgufFile(smol_path))
    beams = np.array([[5, 6, 7], [5, 6, 8], [5, 9, 10], [11, 12, 13]])
    lp = np.log(np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.05], [0.9, 0.1, 0.09], [0.05, 0.04, 0.03]]))
    rd.beams = lambda h, root, w, L, floor=0.0: (beams, lp)
    ctx = DraftContext([], 1, np.zeros(rd.cfg.n_embd, np.float32), None)
    tree = rd.propose(ctx, TreeShape(3, 4, 16))  # no costs: every distinct prefix
    assert len(tree) == 9 and tree.parents[:3] == [-1, 0, 1]
    tree = rd.propose(ctx, TreeShape(3, 4, 16, node_cost=(0.5,) * 16))  # only paths likelier than 0.5
    assert tree.tokens == [5, 6, 7] and tree.parents == [-1, 0, 1]
    assert len(rd.propose(ctx, TreeShape(3, 4, 2))) == 2  # max_nodes


def test_self_gating_chain_keeps_the_prefix_with_the_largest_expected_gain(tiny_drafter, smol_path):
    rd = ReDrafter(tiny_drafter["path"], GgufFile(smol_path), self_gating=True)
    assert rd.self_gating and not ReDrafter.self_gating  # opt-in, per drafter
    ctx = DraftContext([], 1, np.zeros(rd.cfg.n_embd, np.float32), None)
    rd.beams = lambda h, root, w, L, floor=0.0: (np.array([[5, 6, 7]]), np.log(np.array([[0.45, 0.4, 0.35]])))
    # a dear first row (a 2-row verify) and cheap later ones (4 rows cost little more than 2): the whole chain
    # pays (0.45 + 0.4 + 0.35 > 0.5 + 0.1 + 0.0) though its first node alone does not
    tree = rd.propose(ctx, TreeShape(3, 1, 16, node_cost=(0.5, 0.1, 0.0, 0.6)))
    assert tree.tokens == [5, 6, 7] and tree.parents == [-1, 0, 1]
    tree = rd.propose(ctx, TreeShape(3, 1, 16, node_cost=(0.9, 0.5, 0.5)))  # nothing pays: plain decoding
    assert len(tree) == 0


def _generate(backend, prompt, drafter=None, n=48):
    backend.truncate(0)
    stats, out = Stats(), []
    # chains of 2 drafts: 3-row batches are bit-identical to single decodes (4+ rows may move near-ties)
    ctl = controller_for(drafter, width=1, fixed_depth=2) if drafter is not None else None
    steps = plain_steps if drafter is None else speculative_steps(drafter, ctl)
    list(stream(backend, prompt, GenerationConfig(max_tokens=n), stats, steps=steps, out_tokens=out,
                want_hidden=drafter is not None))
    return out, stats


_PLAIN: dict = {}


def _plain(backend, prompt):
    """``_generate`` without a drafter: deterministic, so decoded once per backend and prompt."""
    key = (id(backend), tuple(prompt))
    if key not in _PLAIN:
        _PLAIN[key] = _generate(backend, prompt)[0]
    return list(_PLAIN[key])


def test_trained_drafter_is_lossless(smol, smol_path, tiny_drafter):
    rd = ReDrafter(tiny_drafter["path"], GgufFile(smol_path))
    for text in PROMPTS:
        prompt = smol.tokenize(text)
        plain = _plain(smol, prompt)
        spec, st = _generate(smol, prompt, rd)
        assert spec == plain and st.drafted > 0


def test_shipped_drafter_loads_and_drafts(qwen, qwen_path):
    path = redrafter.shipped("qwen2.5-coder-0.5b")
    assert path is not None, "the qwen2.5-coder-0.5b ReDrafter weights are missing from models/weights"
    assert path.stat().st_size <= 40e6
    rd = ReDrafter(path, GgufFile(qwen_path))
    accepted = 0
    for text in PROMPTS:
        prompt = qwen.tokenize(text)
        plain = _plain(qwen, prompt)
        spec, st = _generate(qwen, prompt, rd)
        assert spec == plain
        accepted += st.accepted
    assert accepted > 0  # a trained head gets some drafts accepted


def test_bad_weights_files_are_refused(tiny_drafter, qwen_path, smol_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        ReDrafter(tmp_path / "missing.npz", GgufFile(smol_path))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        ReDrafter(bad, GgufFile(smol_path))
    cfg, vocab, params = redrafter.load(tiny_drafter["path"])
    params["bias"][0] += 1.0
    redrafter.save(bad, cfg, vocab, params)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip a byte inside the arrays
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError):
        ReDrafter(bad, GgufFile(smol_path))
    with pytest.raises(ValueError, match="trained for a target|no tensor"):
        ReDrafter(tiny_drafter["path"], GgufFile(qwen_path))  # another model's vocabulary


def test_online_adaptation_learns_and_survives_an_interrupted_save(smol, smol_path, tiny_drafter, tmp_path,
                                                                    monkeypatch):
    import os

    import torch

    from edgespec.models.drafting.online import OnlineAdapter, OnlineConfig

    rd = ReDrafter(tiny_drafter["path"], GgufFile(smol_path))
    state = tmp_path / "adapted.npz"
    rd.adapter = OnlineAdapter(rd, OnlineConfig(min_new=4, steps=30, batch=16, lr=3e-3), path=state)
    for text in PROMPTS:
        plain = _plain(smol, smol.tokenize(text))
        spec, _ = _generate(smol, smol.tokenize(text), rd)
        assert spec == plain  # recording does not change the output
    ad = rd.adapter
    assert ad.n > 4 and ad.pending()

    def buffer_loss():
        p = {k: torch.from_numpy(v) for k, v in rd.p_np.items()}
        n = min(ad.n, ad.cfg.capacity)
        with torch.no_grad():
            return float(ad._loss(torch, p, ad.h[:n].astype(np.float32), ad.tokens[:n], ad.top_ids[:n],
                                  ad.top_logp[:n]))

    before, old_bias = buffer_loss(), rd.p_np["bias"].copy()
    assert ad.adapt() == 30 and not ad.pending()
    assert buffer_loss() < before and not np.allclose(rd.p_np["bias"], old_bias)
    ad.save()
    saved = redrafter.load(state)[2]["bias"]
    # a crash between writing the temporary file and the rename: the previous state stays loadable
    rd.p_np["bias"] += 1.0

    def crash(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ad.save()
    monkeypatch.undo()
    np.testing.assert_allclose(redrafter.load(state)[2]["bias"], saved, atol=1e-3)
    ReDrafter(state, GgufFile(smol_path))  # loads and verifies


def test_online_examples_are_the_targets_own_text(qwen, qwen_path):
    """Every committed position becomes one example: the hidden that produced its token, the next tokens of the
    output and the target's top-k after each (its best is the output's next token: greedy)."""
    from edgespec.models.drafting.online import OnlineAdapter

    # the shipped head: a tiny head trained in the test may get no draft accepted on one prompt (it got none on
    # an AMD EPYC Zen 5), and accepted nodes must be recorded too
    rd = ReDrafter(redrafter.shipped("qwen2.5-coder-0.5b"), GgufFile(qwen_path))
    rd.adapter = ad = OnlineAdapter(rd)
    prompt = qwen.tokenize(PROMPTS[0])
    out, stats = _generate(qwen, prompt, rd)
    ad.end_request()
    assert stats.accepted > 0 and len(out) - 1 <= ad.n <= len(out)  # the last token has no verify after it
    for i in range(ad.n):
        m = int((ad.tokens[i] >= 0).sum())
        assert m == min(ad.depth, ad.n - i)
        assert ad.tokens[i, :m].tolist() == out[i:i + m]
        best = ad.top_ids[i, np.arange(m), ad.top_logp[i, :m].argmax(1)]
        nxt = out[i + 1:i + 1 + m]
        assert best[:len(nxt)].tolist() == nxt
    for i in (0, ad.n // 2):  # the hidden state that produced out[i]: the last row of a prefill up to it
        qwen.truncate(0)
        h = qwen.prefill(prompt + out[:i], want_hidden=True).hidden[-1]
        assert np.corrcoef(h, ad.h[i].astype(np.float32))[0, 1] > 0.99


def test_drafter_reset_command(tmp_path, monkeypatch, tiny_drafter):
    import shutil

    from edgespec.cli import main
    from edgespec.models.drafting.online import state_path

    monkeypatch.setenv("EDGESPEC_HOME", str(tmp_path))
    state = state_path(tmp_path, "qwen2.5-coder-0.5b")
    state.parent.mkdir(parents=True)
    shutil.copy(tiny_drafter["path"], state)
    assert main(["drafter", "reset", "--target", "qwen2.5-coder-0.5b"]) == 0
    assert not state.exists()


def test_mlx_step_matches_numpy(tiny_drafter, smol_path):
    mx = pytest.importorskip("mlx.core")
    a = ReDrafter(tiny_drafter["path"], GgufFile(smol_path))
    b = ReDrafter(tiny_drafter["path"], GgufFile(smol_path), xp=mx)
    h = np.random.default_rng(0).standard_normal(a.cfg.n_embd).astype(np.float32) * 4
    ta, ca = a.beams(h, 1000, 3, 3)
    tb, cb = b.beams(h, 1000, 3, 3)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(ca, cb, rtol=1e-3, atol=1e-3)
