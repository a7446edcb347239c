"""The memory plan covers every byte edgespec allocates: a draft model's weights, KV cache and buffers, the
online adapter's trainer and state, small contexts, the backend's KV types, and the live guard's reading."""

import ctypes
import json
import subprocess
import sys

import numpy as np
import pytest

from edgespec import drafters
from edgespec.backends.gguf_file import GgufFile
from edgespec.build import apply_plan, load
from edgespec.drafters import DraftSpec
from edgespec.memory import live
from edgespec.memory.footprint import DRAFT, read_shape, run_footprint
from edgespec.memory.planner import SAFETY, plan
from edgespec.options import LoadOptions

REDRAFTER_05B = drafters.redrafter_weights("qwen2.5-coder-0.5b")  # shipped in models/weights


def test_planner_counts_the_draft_models_weights_and_kv(qwen_path, smol_path):
    target, draft = read_shape(qwen_path), read_shape(smol_path)
    parts = drafters.planned_footprint(DraftSpec("model", str(smol_path)))
    roomy = plan(target, 4 << 30, want_ctx=2048, draft="model", draft_bytes=parts)
    fp = roomy.footprint.parts
    assert roomy.draft == "model" and roomy.n_ctx == 2048
    assert fp[f"{DRAFT}weights"] == draft.weight_bytes
    assert fp[f"{DRAFT}kv_cache"] == 2048 * draft.kv_bytes_per_token(roomy.kv_type)
    assert roomy.footprint.group(DRAFT) > draft.weight_bytes + fp[f"{DRAFT}kv_cache"]  # vocab, buffers too
    assert "draft_weights" in roomy.describe() and "draft_kv_cache" in roomy.describe()
    # room for the target and an 8 MiB drafter, not for the draft model: speculation is dropped, and said so
    plain = run_footprint(target, 2048, "f16", 512, 4, 8 << 20).total
    tight = plan(target, int(plain / (1 - SAFETY)) + 1, want_ctx=2048, min_ctx=2048, draft="model",
                 draft_bytes=parts)
    assert tight.draft is None and tight.footprint.group(DRAFT) == 0
    assert "speculation dropped" in tight.describe() and "draft_weights" in tight.describe()
    assert tight.spec_min > draft.weight_bytes + plain


def test_draft_kv_follows_the_planned_context_and_type(qwen_path, smol_path):
    parts = drafters.planned_footprint(DraftSpec("xvocab", str(smol_path)), target_vocab=151936)
    small, big = parts(512, "q4_0", 128), parts(4096, "f16", 512)
    draft = read_shape(smol_path)
    assert small[f"{DRAFT}kv_cache"] == 512 * draft.kv_bytes_per_token("q4_0")
    assert big[f"{DRAFT}kv_cache"] == 4096 * draft.kv_bytes_per_token("f16")
    assert big[f"{DRAFT}compute_buffer"] > small[f"{DRAFT}compute_buffer"]  # a 512-token batch's activations
    assert small[f"{DRAFT}span_cache"] > 0  # the cross-vocabulary translator's cache


VOCAB_TABLES = """
import json, sys
from edgespec.backends.llama_cpp import LlamaCppBackend
from edgespec.memory import live
from edgespec.models.drafting.cross_vocab import CrossVocabDrafter
target = LlamaCppBackend(sys.argv[1], n_ctx=256, n_threads=2, n_batch=32)
draft = LlamaCppBackend(sys.argv[2], n_ctx=256, n_threads=2, n_batch=32)
before = live.rss_bytes()
x = CrossVocabDrafter(draft, target)  # both vocabularies' token bytes and the translator's index
print(json.dumps({"grown": live.rss_bytes() - before, "n_vocab": target.info.n_vocab}))
"""


def test_cross_vocab_tables_are_declared(qwen_path, smol_path):
    # measured in a fresh process: in this one, memory freed by earlier tests would be reused without growing RSS
    r = subprocess.run([sys.executable, "-c", VOCAB_TABLES, str(qwen_path), str(smol_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    declared = drafters.planned_footprint(DraftSpec("xvocab", str(smol_path)),
                                          target_vocab=out["n_vocab"])(256, "f16", 32)[f"{DRAFT}vocab_maps"]
    assert 0.6 * declared < out["grown"] <= declared, (out["grown"] / 2**20, declared / 2**20)


def test_draft_model_opens_with_the_planned_settings(qwen_path, smol_path):
    spec = f"model:{smol_path}"
    fp = run_footprint(read_shape(qwen_path), 1024, "q8_0", 32, 4,
                       drafters.planned_footprint(DraftSpec("model", str(smol_path)))(1024, "q8_0", 32))
    budget = int(fp.total / (1 - SAFETY)) + 1  # no room for an f16 KV cache at context 1024, at any batch
    # a fixed draft depth: no verify-cost calibration, which the plan and the backends' settings do not depend on
    with load(str(qwen_path), n_ctx=1024, n_threads=2, draft=spec, memory_budget=budget, draft_depth=2) as rt:
        p, d = rt.plan, rt.drafter.backend
        assert p.draft == spec and (p.n_ctx, p.kv_type, p.n_batch) == (1024, "q8_0", 32)
        assert (rt.backend.n_ctx, rt.backend.kv_type, rt.backend.n_batch) == (p.n_ctx, p.kv_type, p.n_batch)
        assert (d.n_ctx, d.kv_type, d.n_batch) == (p.n_ctx, p.kv_type, p.n_batch)


MEASURE = """
import json, sys
from edgespec.build import load
from edgespec.memory.live import peak_rss_bytes
rt = load(sys.argv[1], n_ctx=2048, n_threads=2, draft="model:" + sys.argv[2], memory_budget="4GB", draft_depth=2)
text = "\\n".join(f"def f{i}(x):\\n    return x * {i} + {i * 7} - len(str(x))" for i in range(400))
prompt = rt.backend.tokenize(text)[:1100]  # full prefill batches in the target and, synced, in the draft model
done = rt.generate(prompt, max_tokens=16)
print(json.dumps({"peak": peak_rss_bytes(), "predicted": rt.plan.footprint.total, "drafted": done.stats.drafted}))
"""


def test_target_and_draft_model_peak_rss_as_predicted(qwen_path, smol_path):
    r = subprocess.run([sys.executable, "-c", MEASURE, str(qwen_path), str(smol_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["drafted"] > 0
    assert abs(out["predicted"] / out["peak"] - 1) < 0.03, (out["predicted"] / 2**20, out["peak"] / 2**20)


def test_small_context_with_a_budget(smol_path):
    p = plan(read_shape(smol_path), 1 << 30, want_ctx=256, min_ctx=min(512, 256))
    assert p.n_ctx == 256 and p.n_batch <= 256
    with load(str(smol_path), n_ctx=256, n_threads=2, draft="ngram", memory_budget="1GB") as rt:
        assert rt.backend.n_ctx == 256 and rt.plan.n_ctx == 256
        assert rt.generate("def add(a, b):", max_tokens=8).stats.generated_tokens == 8
    r = subprocess.run([sys.executable, "-m", "edgespec", "generate", "-m", str(smol_path), "--n-ctx", "256",
                        "--memory-budget", "1GB", "--draft", "ngram", "-n", "4", "--raw", "def add(a, b):"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def test_context_between_halvings_still_reaches_the_least(smol_path):
    shape = read_shape(smol_path)
    least = run_footprint(shape, 512, "q4_0", 32, 1).total
    p = plan(shape, int(least / (1 - SAFETY)) + 1, want_ctx=3000, min_ctx=512)
    assert (p.n_ctx, p.kv_type, p.n_batch) == (512, "q4_0", 32)  # 3000 -> 1500 -> 750 -> 512, not a refusal


def test_adapters_declared_bytes_are_counted_when_adapting(qwen_path):
    from edgespec.models.drafting import online

    spec = DraftSpec("redrafter", str(REDRAFTER_05B))
    opts = LoadOptions(n_ctx=2048, draft=str(spec), memory_budget="4GB")
    _, _, still = apply_plan(opts, qwen_path, spec, adapt=False)
    _, _, adapting = apply_plan(opts, qwen_path, spec, adapt=True)
    declared = online.declared_bytes(REDRAFTER_05B)
    assert declared >= online.TRAINER_RUNTIME_BYTES
    assert adapting.footprint.total - still.footprint.total == declared
    assert adapting.footprint.parts[f"{DRAFT}adapt_trainer"] == online.TRAINER_RUNTIME_BYTES
    assert f"{DRAFT}adapt_trainer" not in still.footprint.parts


def test_adapters_live_footprint_matches_its_declaration(qwen_path):
    from edgespec.models.drafting import online
    from edgespec.models.drafting.redrafter import ReDrafter

    d = ReDrafter(REDRAFTER_05B, GgufFile(qwen_path))
    d.adapter = online.OnlineAdapter(d)
    assert d.adapter.footprint() == online.declared_bytes(REDRAFTER_05B)
    assert d.footprint()["max"] >= d.adapter.footprint() + 4 * d.n_params


def test_mlx_plans_only_f16(qwen_path):
    shape = read_shape(qwen_path)
    q8 = run_footprint(shape, 4096, "q8_0", 32, 4, 8 << 20).total
    budget = int(q8 / (1 - SAFETY)) + 1  # llama.cpp keeps context 4096 with a quantized KV cache
    llama = plan(shape, budget, draft="ngram", draft_bytes=8 << 20)
    mlx = plan(shape, budget, draft="ngram", draft_bytes=8 << 20, backend="mlx")
    assert llama.n_ctx == 4096 and llama.kv_type != "f16"
    assert mlx.kv_type == "f16" and mlx.n_ctx < 4096
    for b in (budget, 2 * budget, 4 * budget):
        assert plan(shape, b, min_ctx=256, backend="mlx").kv_type == "f16"


def test_mlx_backend_refuses_a_quantized_kv_cache(smol_path):
    pytest.importorskip("mlx.core")
    from edgespec.backends.base import BackendError
    from edgespec.backends.mlx_backend import MlxBackend

    with pytest.raises(BackendError, match="kv_type"):
        MlxBackend(smol_path, n_ctx=256, kv_type="q8_0", progress=False)


def test_live_guard_reads_the_current_resident_set_not_the_peak():
    before = live.rss_bytes()
    big = np.ones(256 << 20, np.uint8)  # 256 MiB, touched
    held = live.rss_bytes()
    del big
    after = live.rss_bytes()
    assert held - before > 200 << 20
    assert held - after > 200 << 20  # freed memory leaves the reading ...
    assert live.peak_rss_bytes() - after > 200 << 20  # ... and stays in the peak


def test_macos_reading_is_the_tasks_resident_size(monkeypatch):
    # MACH_TASK_BASIC_INFO_COUNT is 12 natural_t words: the struct must be laid out as <mach/task_info.h> does
    assert ctypes.sizeof(live._MachTaskBasicInfo) == 48
    assert live._MachTaskBasicInfo.resident_size.offset == 8
    monkeypatch.setattr(live, "_read_statm", lambda: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(live.sys, "platform", "darwin")
    monkeypatch.setattr(live, "_mach_resident_bytes", lambda: 123 << 20)
    assert live.rss_bytes() == 123 << 20


def test_a_server_plan_counts_the_servers_libraries(smol_path, capsys):
    """Under a budget the plan counts the runtime's libraries, and for `edgespec serve` the server's too."""
    from edgespec.cli import main
    from edgespec.memory.footprint import RUNTIME_OVERHEAD, SERVER_OVERHEAD

    opts, spec = LoadOptions(memory_budget="1GB", draft="none"), DraftSpec("none")
    plain = apply_plan(opts, smol_path, spec, adapt=False)[2].footprint
    served = apply_plan(opts, smol_path, spec, adapt=False, overhead=RUNTIME_OVERHEAD + SERVER_OVERHEAD)[2].footprint
    assert plain.parts["runtime_overhead"] == RUNTIME_OVERHEAD
    assert served.total - plain.total == SERVER_OVERHEAD
    assert main(["plan", "-m", str(smol_path), "--memory-budget", "1GB", "--draft", "none", "--serve"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "runtime_overhead" in x)
    assert f"{(RUNTIME_OVERHEAD + SERVER_OVERHEAD) / 2**20:.1f} MiB" in line
