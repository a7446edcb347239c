"""Runs under a memory budget: the plan is applied, the live guard shrinks then stops drafting, peak RSS
stays under the budget through a multi-turn chat that fills the context, and the memory-limit bench."""

import json
import subprocess
import sys

import pytest

from edgespec import load
from edgespec.drafters import NGRAM_BYTES
from edgespec.memory.footprint import read_shape, run_footprint
from edgespec.memory.live import MemoryGuard, rss_bytes
from edgespec.memory.planner import SAFETY, BudgetError
from edgespec.models.drafting.ngram import NgramDrafter
from edgespec.runtime import Runtime

TIGHT_RUN = """
import json, sys
from edgespec import load
from edgespec.memory.live import peak_rss_bytes
rt = load(sys.argv[1], n_ctx=1024, n_threads=2, draft="ngram", memory_budget=int(sys.argv[2]))
sess = rt.session(system="You are terse.")
after = 0
for i in range(60):  # until the context has overflowed a few times
    list(sess.send(f"Turn {i}: write a Python function number {i} that adds {i} to a list of numbers.", max_tokens=48))
    after += sess.dropped > 0
    if after >= 4:
        break
print(json.dumps({"peak": peak_rss_bytes(), "n_ctx": rt.backend.n_ctx, "kv": rt.backend.kv_type,
                  "dropped": sess.dropped, "draft": rt.drafter.name if rt.drafter else None,
                  "memory": rt.memory_stats()}))
"""


def test_tight_budget_multi_turn_chat_stays_under(smol_path):
    shape = read_shape(smol_path)
    # room for a 512-token context with speculation, not for the 1024 asked for
    budget = int(run_footprint(shape, 512, "f16", 128, 4, NGRAM_BYTES).total / (1 - SAFETY) * 1.005)
    r = subprocess.run([sys.executable, "-c", TIGHT_RUN, str(smol_path), str(budget)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_ctx"] < 1024 or out["kv"] != "f16"  # the planner shrank the run to fit
    assert out["dropped"] > 0  # the conversation outgrew the context and the policy dropped old turns
    assert out["peak"] <= budget, (out["peak"] / 2**20, budget / 2**20)
    assert out["memory"]["budget"] == budget and out["memory"]["peak_rss"] <= budget


def test_budget_below_the_bound_is_refused_at_once(smol_path):
    with pytest.raises(BudgetError, match="at least"):
        load(str(smol_path), memory_budget="40MB")


def test_guard_shrinks_the_tree_then_stops_drafting(smol):
    g = MemoryGuard(budget=int((rss_bytes() + 224 * (1 << 20)) / 0.95), node_bytes=64 << 20)
    assert g.node_cap(16) == 2 and g.shrinks == 1  # 3.5 nodes of headroom: the root's row and two nodes
    g = MemoryGuard(budget=rss_bytes() // 2, node_bytes=1 << 20)
    assert g.node_cap(16) == 0 and g.stops == 1
    # in a run: no headroom means plain decoding, with the same output
    rt = Runtime(smol, "smollm2-135m", NgramDrafter(), fixed_depth=2)  # drafts every step, whatever it costs
    prompt = "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9,"
    free = rt.generate(prompt, max_tokens=32)
    rt.controller.memory = MemoryGuard(budget=rss_bytes() // 2, node_bytes=1 << 20)
    capped = rt.generate(prompt, max_tokens=32)
    assert capped.tokens == free.tokens
    assert free.stats.drafted > 0 and capped.stats.drafted == 0
    assert rt.memory_stats()["draft_stops"] > 0


def test_memory_bench_reports_each_budget(smol_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgespec", "bench", "--model", str(smol_path), "--memory-budgets",
                        "40MB,plain+15%", "--draft", "ngram", "--n", "1", "--max-tokens", "16", "--chat-tokens", "8",
                        "--n-ctx", "1024", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "membench.json").read_text())["results"]
    assert len(res) == 4 and (tmp_path / "membench.png").exists()
    refused = [v for k, v in res.items() if k.startswith("40MB")][0]
    assert "at least" in refused["refused"]
    fitted = [v for k, v in res.items() if k.startswith("plain+15%")][0]
    assert fitted["peak_rss"] <= fitted["budget"] and fitted["scenarios"]["chat"]["tokens"] > 0
    he, plain = (res[k]["scenarios"]["humaneval"] for k in ("ngram (no budget)", "plain (no budget)"))
    # its own plain decoding, in the same process: with one prompt the speedup is the ratio of the two rates
    assert he["plain_tok_s"] > 0 and he["speedup"] == pytest.approx(he["tok_s"] / he["plain_tok_s"], rel=1e-6)
    # lossless and counted alike: as many tokens as plain decoding (no draft past max_tokens), each verify
    # yielding its accepted drafts plus one token
    assert he["tokens"] == plain["tokens"] > 0 and len(he["per_call_tok_s"]) == 1
    assert 1 <= he["tokens_per_verify"] <= he["tokens"] and plain["tokens_per_verify"] == 1
    assert "speedup" not in plain
