"""The edgespec command, end to end in a subprocess."""

import subprocess
import sys

import pytest


def run(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgespec", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


def test_generate_end_to_end(smol_path, smol_rt):
    """The answer is the model's greedy one (``--exact``: the drafter's verifies stay bit-identical to plain
    decoding), as the API gives it."""
    prompt = "Write a Python function that adds two numbers."
    r = run("generate", "--model", "smollm2-135m", "--max-tokens", "24", "--threads", "2", "--exact", prompt)
    assert r.returncode == 0, r.stderr
    want = smol_rt.chat([{"role": "user", "content": prompt}], max_tokens=24, temperature=0).text
    assert len(want) > 10 and r.stdout == want + "\n"
    assert "tok/s" in r.stderr and "TTFT" in r.stderr


def test_generate_from_stdin_raw(smol_path, smol_rt):
    r = run("generate", "--model", str(smol_path), "--raw", "--max-tokens", "8", "--exact", input="def add(a, b):")
    assert r.returncode == 0, r.stderr
    want = smol_rt.generate("def add(a, b):", max_tokens=8, temperature=0).text  # the raw greedy continuation
    assert want.strip() and r.stdout == want + "\n"


def test_chat_end_to_end(smol_path):
    script = "Hello!\n/stats\nWhat did I just say?\n/reset\n/exit\n"
    r = run("chat", "--model", "smollm2-135m", "--max-tokens", "16", "--system", "Be brief.", input=script)
    assert r.returncode == 0, r.stderr
    assert "KV cache:" in r.stderr and "turns: 1" in r.stderr
    assert "conversation cleared" in r.stderr
    assert r.stderr.count("tok/s") >= 2


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "no-such-model", "hi"], "Unknown model id"),
    (["generate", "--model", "/nonexistent/x.gguf", "hi"], "not found"),
    (["generate", "--model", "smollm2-135m", "--top-p", "0", "hi"], "top_p"),
    (["models", "path", "definitely-not"], "Unknown model id"),
])
def test_cli_errors_are_clear(smol_path, args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_models_list():
    r = run("models", "list")
    assert r.returncode == 0
    for mid in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m", "gemma-3-270m"):
        assert mid in r.stdout


def test_bench_names_every_bench_and_passes_server_options_through():
    r = run("bench", "--help")
    assert r.returncode == 0
    for opt in ("--memory-budgets", "--online", "--server"):
        assert opt in r.stdout
    for flag in ("--server", "--serv"):  # argparse's abbreviation goes the same way
        r = run("bench", flag, "--help")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("usage: edgespec bench --server") and "--sections" in r.stdout
    r = run("bench", "--server", "--prompts", "chat")  # a speed-bench option is refused, not ignored
    assert r.returncode == 2 and "unrecognized arguments: --prompts chat" in r.stderr


def test_generate_structured(smol_path, tmp_path):
    import json
    import re

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
                                  "required": ["name"], "additionalProperties": False}))
    r = run("generate", "--model", "smollm2-135m", "--max-tokens", "40", "--threads", "2", "--draft", "none",
            "--json-schema", str(schema), "--stats-json", "Name a famous scientist as JSON.")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"name"}
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["finish_reason"] == "eos" and stats["forced"] > 0
    r = run("generate", "--model", "smollm2-135m", "--max-tokens", "16", "--threads", "2", "--draft", "none", "--raw",
            "--regex", "[0-9]{4}", "The year the war ended:")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch("[0-9]{4}", r.stdout.strip())
    r = run("generate", "--model", "smollm2-135m", "--grammar", str(tmp_path / "missing.lark"), "hi")
    assert r.returncode == 2 and "--grammar" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--model", "smollm2-135m", "--regex", "[a-", "hi")
    assert r.returncode == 2 and "unclosed" in r.stderr and "Traceback" not in r.stderr
