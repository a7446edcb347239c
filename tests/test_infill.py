"""Fill in the middle: FIM prompts from the model's own metadata (qwen2.5-coder-0.5b has FIM tokens, smollm2-135m
has none), the editor stops (``LineStop``), ``Runtime.infill``, and the server's ``POST /infill`` (llama.vscode's
request shape, replayed from its source) and ``suffix`` on ``/v1/completions`` (the real ``openai`` client)."""

from __future__ import annotations

import json
import threading
import time

import llama_cpp as lc
import pytest

import edgespec
from edgespec import generate
from edgespec.backends.base import common_prefix
from edgespec.generate import LineStop, TextOut
from edgespec.infill import (
    SUFFIX_TOKENS,
    FimTokens,
    NoFimError,
    anchored,
    fim_prompt,
    fim_tokens,
    require_fim,
)
from tests.conftest import QWEN, SMALL
from tests.test_stop_strings import CharBackend

N_CTX = 2048
PREFIX = "import math\n\n\ndef area(r):\n    "
SUFFIX = "\n\n\ndef main():\n    print(area(2.0))\n"
EXTRA = [{"filename": "geometry/util.py", "text": "def square(x):\n    return x * x\n"},
         {"filename": "geometry/consts.py", "text": "PI = 3.14159"}]


def rendered(backend, tokens: list[int]) -> str:
    return b"".join(backend._piece(t, special=True) for t in tokens).decode()


# ---- FIM tokens and prompts --------------------------------------------------------------------------
def test_fim_tokens_match_llama_cpp_and_refusal(qwen, smol):
    fim = fim_tokens(qwen)
    own = {k: getattr(lc, f"llama_vocab_fim_{k}")(qwen._vocab) for k in ("pre", "suf", "mid", "pad", "rep", "sep")}
    assert {k: getattr(fim, k) for k in own} == own  # the same ids llama.cpp itself reads
    assert qwen.meta("tokenizer.ggml.fim_pre_token_id") is None  # found by text, as llama.cpp falls back
    assert rendered(qwen, [fim.pre, fim.suf, fim.mid]) == "<|fim_prefix|><|fim_suffix|><|fim_middle|>"

    small = fim_tokens(smol)
    assert small.pre is None and small.suf is None and small.mid is None and not small.usable
    with pytest.raises(NoFimError, match="fill-in-the-middle"):
        require_fim(smol)
    with pytest.raises(ValueError):
        fim_prompt(smol, "def f():\n", "\n")


def test_fim_tokens_from_gguf_keys(qwen):
    """Where the GGUF has the keys, their ids are taken as they are."""

    class Keyed:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def meta(self, key):
            return {"tokenizer.ggml.fim_pre_token_id": "11", "tokenizer.ggml.fim_suf_token_id": "12",
                    "tokenizer.ggml.fim_mid_token_id": "13", "tokenizer.ggml.fim_sep_token_id": "-1"}.get(key)

    fim = fim_tokens(Keyed(qwen))
    assert (fim.pre, fim.suf, fim.mid, fim.sep) == (11, 12, 13, None)
    assert fim.rep == fim_tokens(qwen).rep  # no key: found by its text


def test_fim_prompt_layout(qwen):
    bare = fim_prompt(qwen, PREFIX, SUFFIX)
    assert rendered(qwen, bare.tokens) == ("<|repo_name|>myproject\n<|file_sep|>filename\n<|fim_prefix|>" + PREFIX
                                           + "<|fim_suffix|>" + SUFFIX + "<|fim_middle|>")
    assert not bare.truncated and bare.n_extra == 0

    repo = fim_prompt(qwen, PREFIX, SUFFIX, EXTRA, prompt="return ", filename="geometry/area.py", repo="geo")
    assert rendered(qwen, repo.tokens) == (
        "<|repo_name|>geo\n"
        "<|file_sep|>geometry/util.py\ndef square(x):\n    return x * x\n"
        "<|file_sep|>geometry/consts.py\nPI = 3.14159\n"
        "<|file_sep|>geometry/area.py\n"
        "<|fim_prefix|>" + PREFIX + "return <|fim_suffix|>" + SUFFIX + "<|fim_middle|>")
    assert repo.n_extra == 2
    # what changes least comes first: a change at the cursor keeps the repository context as a token prefix
    typed = fim_prompt(qwen, PREFIX, SUFFIX, EXTRA, prompt="return math.", filename="geometry/area.py", repo="geo")
    common = common_prefix(repo.tokens, typed.tokens)
    assert common > len(repo.tokens) - len(repo.suffix_tokens) - 8
    # control tokens in the user's text stay text
    literal = fim_prompt(qwen, "x = '<|fim_middle|>'\n", "")
    assert literal.tokens.count(fim_tokens(qwen).mid) == 1


def test_fim_prompt_truncates_to_fit(qwen):
    prefix = "".join(f"value_{i} = {i}\n" for i in range(2000))
    suffix = "".join(f"other_{i} = {i}\n" for i in range(2000))
    extra = [{"filename": f"f{i}.py", "text": f"x_{i} = {i}\n" * 20} for i in range(5)]
    fp = fim_prompt(qwen, prefix, suffix, extra, reserve=128)
    fim = fim_tokens(qwen)
    assert fp.truncated and fp.n_extra == 0
    assert len(fp.tokens) <= N_CTX - 1 - 128
    assert fp.tokens[-1] == fim.mid and fim.pre in fp.tokens and fim.suf in fp.tokens
    text = rendered(qwen, fp.tokens)
    assert text.split("<|fim_suffix|>")[0].endswith("value_1999 = 1999\n")  # the cursor's side is kept
    assert text.split("<|fim_suffix|>")[1].startswith("other_0 = 0\n")
    long = fim_prompt(qwen, PREFIX, suffix)  # the suffix's start only, as llama-server; all of it for drafting
    assert not long.truncated and len(long.suffix_tokens) > 1000
    assert long.tokens[-SUFFIX_TOKENS - 2:-1] == [fim.suf] + long.suffix_tokens[:SUFFIX_TOKENS]
    room = fim_prompt(qwen, PREFIX, SUFFIX, extra * 40, reserve=128)  # extra chunks dropped, oldest first
    assert room.truncated and 0 < room.n_extra < 200 and len(room.tokens) <= N_CTX - 1 - 128


def test_anchored_prefix_keeps_the_window_start():
    lines = [f"line_{i} = {i}" for i in range(400)]

    def window(a: int, b: int) -> str:
        return "\n".join(lines[a:b]) + "\n"

    first = anchored("", window(0, 256))
    assert first == window(0, 256)
    down = anchored(first, window(1, 257))  # Enter: the window slides by a line, its start stays
    assert down == window(0, 257)
    assert anchored(down, window(40, 296)) == window(0, 296)  # a jump down within the window
    assert anchored(down, window(0, 200)) == window(0, 200)  # up: nothing to keep
    other = "".join(f"x{i} = {i}\n" for i in range(300))
    assert anchored(down, other) == other  # another file
    assert anchored(down, window(256, 257)) == window(256, 257)  # too little overlap to be sure


# ---- the editor stops --------------------------------------------------------------------------------
def emit(text: str, lines: LineStop) -> tuple[str, str]:
    out = TextOut(CharBackend(), (), lines)
    got = "".join(out.push(ord(c)) for c in text if not out.stopped)
    return got + out.finish(), out.reason


def test_indent_stop():
    body = "if x:\n        y = 1\n        z = 2\n    return y\nprint(1)\n"
    assert emit(body, LineStop(n_indent=8)) == ("if x:\n        y = 1\n        z = 2\n", "indent")
    assert emit(body, LineStop(n_indent=4)) == ("if x:\n        y = 1\n        z = 2\n    return y\n", "indent")
    assert emit(body, LineStop()) == (body, "")
    # the first line is never cut; an empty line ends an indented block (as in llama-server)
    assert emit("x = 1\n    a\n\n    b\n", LineStop(n_indent=4)) == ("x = 1\n    a\n", "indent")
    # a line's indentation is not emitted before it is known
    out = TextOut(CharBackend(), (), LineStop(n_indent=4))
    assert "".join(out.push(ord(c)) for c in "a\n  ") == "a\n"
    assert out.push(ord("b")) == "" and out.stopped and out.text == "a\n"


def test_time_stop_ends_at_a_newline(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(generate.time, "perf_counter", lambda: clock[0])
    lines = LineStop(t_max_s=0.5)
    out = TextOut(CharBackend(), (), lines)
    assert "".join(out.push(ord(c)) for c in "ab\ncd") == "ab\ncd"  # within the time
    clock[0] += 1.0
    assert "".join(out.push(ord(c)) for c in "ef\ngh") == "ef\n" and out.stopped and out.reason == "time"


# ---- Runtime.infill ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(qwen_path):
    r = edgespec.load(QWEN, n_ctx=N_CTX, n_threads=2, draft="ngram", exact=True, adapt=False)
    yield r
    r.close()


def test_runtime_infill(rt):
    fp = fim_prompt(rt.backend, PREFIX, SUFFIX, EXTRA)
    rt.backend.truncate(0)
    want = rt.generate(fp.tokens, max_tokens=12, temperature=0)
    rt.backend.truncate(0)
    got = rt.infill(PREFIX, SUFFIX, EXTRA, max_tokens=12)
    assert got.text == want.text and got.tokens == want.tokens
    gen = rt.infill(PREFIX, SUFFIX, EXTRA, max_tokens=12, stream=True)
    assert gen.text() == want.text and gen.stats.prefill_tokens < gen.stats.prompt_tokens  # the prompt was reused
    loop = rt.infill("def total(items):\n    ", "\n", max_tokens=40, n_indent=4)
    assert loop.stats.finish_reason in ("indent", "eos", "length")
    after_first = loop.text.split("\n")[1:]
    assert all(not line.strip() or line.startswith("    ") for line in after_first)


def test_runtime_infill_refused_without_fim_tokens(smol_path):
    with edgespec.load(SMALL, n_ctx=512, n_threads=2, draft="none", adapt=False) as small:
        with pytest.raises(ValueError, match="fill-in-the-middle"):
            small.infill("def f():\n", "\n")


# ---- the server --------------------------------------------------------------------------------------
fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from edgespec.server import Server, ServerConfig, create_app  # noqa: E402
from tests.conftest import KEY, serve_in_thread  # noqa: E402


def start(rt, name: str):
    srv = Server(ServerConfig(model_name=name, api_key=KEY, max_queue=16))
    srv.attach(rt)
    server, thread, url = serve_in_thread(create_app(srv))
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    return srv, server, thread, url, client


@pytest.fixture(scope="module")
def served(rt):
    srv, server, thread, url, client = start(rt, QWEN)
    yield rt, srv, url, client
    server.should_exit = True
    thread.join(30)
    srv.engine.stop()


def vscode_request(prefix: str, suffix: str, prompt: str, chunks: list[dict], nindent: int, warm: bool = False):
    """llama.vscode's ``createRequestPayload`` (src/llama-server.ts), with its default settings (but ``n_predict``
    24 instead of 128, for a slow CI machine)."""
    if warm:
        return {"input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": prompt,
                "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    return {"input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": prompt,
            "n_predict": 24, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, **({"n_indent": nindent} if nindent else {}), "t_max_prompt_ms": 500,
            "t_max_predict_ms": 0}


def vscode_chunks(chunks: list[dict]) -> list[dict]:
    """llama.vscode's ring-buffer chunks (src/extra-context.ts): ``{text, time, filename}``."""
    return [{"text": c["text"], "time": 1733480000000 + i, "filename": c["filename"]} for i, c in enumerate(chunks)]


def test_llama_vscode_request_shape(served):
    rt, srv, url, client = served
    chunks = vscode_chunks(EXTRA)
    rt.backend.truncate(0)
    r = client.post("/infill", json=vscode_request("", "", "", chunks, 0, warm=True))  # updateExtraContext
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "" and r.json()["tokens_cached"] > 0

    prefix, prompt = "import math\n\n\ndef area(r):\n", "    return "
    body = vscode_request(prefix, SUFFIX, prompt, chunks, 4)
    r = client.post("/infill", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    # the fields llama.vscode reads (completion.ts and its status bar)
    assert isinstance(data["content"], str) and data["content"].strip()
    assert isinstance(data["tokens_cached"], int) and data["tokens_cached"] > 0
    assert data["truncated"] is False and data["generation_settings"]["n_ctx"] == N_CTX
    t = data["timings"]
    for k in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"):
        assert isinstance(t[k], int | float), k
    assert t["cache_n"] > 0 and t["prompt_n"] < data["tokens_evaluated"]  # the warmed context was reused
    rt.backend.truncate(0)
    want = rt.infill(prefix, SUFFIX, EXTRA, prompt=prompt, max_tokens=24, n_indent=4, top_k=40, top_p=0.99)
    assert data["content"] == want.text
    assert data["stop_type"] in ("eos", "limit", "word")

    # streamed: pieces with stop false, then the whole object with stop true
    rt.backend.truncate(0)
    with client.stream("POST", "/infill", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == want.text
    assert events[-1]["generation_settings"]["n_ctx"] == N_CTX

    # llama.vim's response_fields
    r = client.post("/infill", json={**body, "response_fields": ["content", "timings/prompt_n", "tokens_cached"]})
    assert set(r.json()) == {"content", "timings/prompt_n", "tokens_cached"}


def test_sliding_window_keeps_the_prompt_cached(served):
    """llama.vscode's window of lines before the cursor slides at a new line: the server keeps its start."""
    rt, srv, url, client = served
    lines = ["def weighted(values):", "    total = 0"] + [f"    total += values[{i}] * {i}" for i in range(300)]

    def at(line: int) -> dict:
        prefix = "\n".join(lines[max(0, line - 50):line]) + "\n"
        return {**vscode_request(prefix, "    return total\n", "    ", EXTRA[:1], 4), "n_predict": 4}

    rt.backend.truncate(0)
    one = client.post("/infill", json=at(80)).json()
    two = client.post("/infill", json=at(81)).json()  # the next line: the window lost its first line
    assert one["timings"]["prompt_n"] == one["tokens_evaluated"]
    assert two["timings"]["cache_n"] >= one["tokens_evaluated"] - 40  # all but the end of the prompt reused
    assert two["tokens_evaluated"] > one["tokens_evaluated"]  # the prompt kept the line the window dropped


def test_infill_bounds(served):
    rt, srv, url, client = served
    r = client.post("/infill", json={"input_prefix": "x", "input_extra": [{"text": "y"}] * 300})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input_extra")
    r = client.post("/infill", json={"input_prefix": "x = 1\n" * 25000})
    assert r.status_code in (400, 413)
    r = client.post("/infill", json={"input_prefix": "x", "lora": [{"id": 0, "scale": 0.5}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
    r = client.post("/infill", json={"input_prefix": "x", "n_indent": -1})
    assert r.status_code == 400


def test_suffix_on_completions_with_openai_client(served):
    rt, srv, url, client = served
    rt.backend.truncate(0)
    want = rt.infill(PREFIX, SUFFIX, max_tokens=16, temperature=0).text
    rt.backend.truncate(0)
    oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    r = oa.completions.create(model=QWEN, prompt=PREFIX, suffix=SUFFIX, max_tokens=16, temperature=0)
    assert r.choices[0].text == want and want


def test_new_request_supersedes_the_running_one(served):
    rt, srv, url, client = served
    long = {"input_prefix": "numbers = [\n" + "".join(f"    {i},\n" for i in range(1, 40)), "input_suffix": "]\n",
            "n_predict": 1000, "stream": True}
    events: list = []
    started = threading.Event()

    def first():
        with client.stream("POST", "/infill", json=long) as s:
            for line in s.iter_lines():
                events.append(line)
                if line.startswith("data: "):
                    started.set()
        started.set()

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(300)
    r = client.post("/infill", json={"input_prefix": "def one():\n    return ", "input_suffix": "\n",
                                     "n_predict": 8})
    t.join(300)
    assert r.status_code == 200 and r.json()["stop"] is True and not r.json().get("superseded")
    # the replaced request answers at once with no text (an error would make an editor show a message)
    assert "event: error" not in events
    last = json.loads([e for e in events if e.startswith("data: ")][-1][6:])
    assert last["superseded"] is True and last["stop"] is True and last["content"] == ""
    assert last["generation_settings"]["n_ctx"] == N_CTX and last["stop_type"] == "none"

    answers: list = []  # the same, answered whole
    t = threading.Thread(target=lambda: answers.append(client.post("/infill", json={**long, "stream": False})))
    t.start()
    def running() -> bool:  # the worker has taken it (not the earlier request, still being cleared away)
        job = srv.engine.current
        return job is not None and job.req.max_tokens == 1000

    while not running() and t.is_alive():
        time.sleep(0.01)
    r = client.post("/infill", json={"input_prefix": "def two():\n    return ", "n_predict": 4})
    t.join(300)
    assert r.status_code == 200 and not r.json().get("superseded")
    assert answers[0].status_code == 200 and answers[0].json()["superseded"] is True


def test_server_refuses_a_model_without_fim(smol_path):
    small = edgespec.load(SMALL, n_ctx=512, n_threads=2, draft="none", adapt=False)
    srv, server, thread, url, client = start(small, SMALL)
    try:
        r = client.post("/infill", json={"input_prefix": "def f():\n", "input_suffix": "\n"})
        assert r.status_code == 400 and "fill-in-the-middle" in r.json()["error"]["message"]
        oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as e:
            oa.completions.create(model=SMALL, prompt="def f():\n", suffix="\n", max_tokens=4)
        assert e.value.body["param"] == "suffix"
    finally:
        server.should_exit = True
        thread.join(30)
        srv.close()


def test_fim_tokens_dataclass_defaults():
    assert not FimTokens().usable and FimTokens(1, 2, 3).usable


def test_cli_cursor_split():
    from edgespec.commands.infill import split_at

    text = "def f():\n    return 1\n\nx = f()\n"
    assert split_at(text, "2:5") == ("def f():\n    ", "return 1\n\nx = f()\n")
    assert split_at(text, "1:99") == ("def f():", "\n    return 1\n\nx = f()\n")  # past the end: at the end
    assert split_at(text, "4:1") == ("def f():\n    return 1\n\n", "x = f()\n")
    for bad in ("0:1", "5:1", "2", "a:b"):
        with pytest.raises(ValueError, match="cursor"):
            split_at(text, bad)


def test_cli_infill_end_to_end(qwen_path, smol_path, tmp_path):
    from tests.test_cli import run

    f = tmp_path / "add.py"
    f.write_text("def add(a, b):\n    \n\n\nprint(add(1, 2))\n")
    r = run("infill", "--model", QWEN, "--file", str(f), "--cursor", "2:5", "--max-tokens", "12", "--n-indent", "4",
            "--threads", "2", "--draft", "none")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr
    r = run("infill", "--model", SMALL, "--prefix-file", str(f), "--max-tokens", "4", "--draft", "none")
    assert r.returncode == 2 and "fill-in-the-middle" in r.stderr and "Traceback" not in r.stderr
