"""Structured outputs (issue 27): response formats checked when a request is made, outputs valid against their
schema greedy and sampled, grammar-cut drafts never verified, forced-token batching and drafting under a grammar
changing no greedy token, and the acceptance rule applied to the masked distribution."""

import dataclasses
import functools
import json
import re

import numpy as np
import pytest

import edgespec
from edgespec.backends.base import detokenize
from edgespec.controller import controller_for
from edgespec.generate import GenerationConfig, Stats, plain_steps, stream
from edgespec.models.drafting.drafter import DraftTree, pack_beams
from edgespec.sampling import PositionRng, SamplingParams, probs
from edgespec.speculative import accept_sampling, prune, speculative_steps
from edgespec.structured import Constraint, grammar_of
from tests.conftest import SMALL
from tests.test_speculative import OracleDrafter

jsonschema_rs = pytest.importorskip("jsonschema_rs")
openai = pytest.importorskip("openai")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["nurse", "teacher", "engineer", "other"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "skills"],
    "additionalProperties": False,
}
PROMPT = ("Extract the person from the text as JSON.\nText: Maria Lopez is 34. She works as a nurse in Valencia "
          "and speaks Spanish and English.\nJSON: ")
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


# ---- formats checked when the request is made ---------------------------------------------------
@pytest.mark.parametrize("fmt", [
    None, {"type": "text"}, {"type": "json_object"}, schema_format(PERSON), {"type": "regex", "pattern": DATE},
    {"type": "grammar", "grammar": 'start: "yes" | "no"'}, {"type": "grammar", "grammar": 'root ::= "yes" | "no"'},
])
def test_valid_formats(fmt):
    edgespec.Request(response_format=fmt)


@pytest.mark.parametrize("fmt,named", [
    ({"type": "xml"}, "response_format.type"),
    ("json", "must be an object"),
    ({"type": "json_schema"}, "json_schema"),
    (schema_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (schema_format({"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}), "/defs/x"),
    (schema_format({"type": "strin"}), "strin"),
    ({"type": "regex", "pattern": "[a-"}, "unclosed character class"),
    ({"type": "grammar", "grammar": 'root ::= "a" missing'}, "missing"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "undefined_rule"),
])
def test_invalid_formats_name_the_problem(fmt, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        edgespec.Request(response_format=fmt)


def test_ignore_eos_conflicts_with_a_grammar():
    with pytest.raises(ValueError, match="ignore_eos"):
        edgespec.Request(response_format={"type": "json_object"}, ignore_eos=True)


# ---- the runtime API ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(smol_path):
    r = edgespec.load(SMALL, n_ctx=1024, n_threads=2, draft="none", adapt=False)
    yield r
    r.close()


def test_json_schema_greedy_and_sampled_valid(rt):
    validator = jsonschema_rs.validator_for(PERSON)
    for opts in [{}, {"temperature": 0.9, "seed": 1}, {"temperature": 0.9, "seed": 2}, {"temperature": 1.0, "seed": 3}]:
        c = rt.generate(PROMPT, max_tokens=120, response_format=schema_format(PERSON), **opts)
        assert c.stats.finish_reason == "eos", (opts, c.text)
        validator.validate(json.loads(c.text))
        assert c.stats.forced > 0  # keys, quotes and separators came without sampling


def test_same_seed_same_output(rt):
    a = rt.generate(PROMPT, max_tokens=80, response_format=schema_format(PERSON), temperature=1.0, seed=7)
    b = rt.generate(PROMPT, max_tokens=80, response_format=schema_format(PERSON), temperature=1.0, seed=7)
    assert a.text == b.text


def test_json_object_regex_and_grammars(rt):
    c = rt.generate("A JSON object describing a cat: ", max_tokens=80, response_format={"type": "json_object"})
    assert isinstance(json.loads(c.text), dict)
    c = rt.generate("The first moon landing was on ", max_tokens=20, response_format={"type": "regex", "pattern": DATE})
    assert re.fullmatch(DATE, c.text) and c.stats.finish_reason == "eos"
    for grammar in ('start: "yes" | "no"', 'root ::= "yes" | "no"'):
        fmt = {"type": "grammar", "grammar": grammar}
        c = rt.generate("Is the sky blue? Answer: ", max_tokens=8, response_format=fmt)
        assert c.text in ("yes", "no")


def test_chat_with_a_schema(rt):
    c = rt.chat([{"role": "user", "content": PROMPT}], max_tokens=120, response_format=schema_format(PERSON))
    jsonschema_rs.validator_for(PERSON).validate(json.loads(c.text))


def test_a_grammar_that_cannot_finish_ends_with_length(rt):
    c = rt.generate(PROMPT, max_tokens=6, response_format=schema_format(PERSON))
    assert c.stats.finish_reason == "length" and c.stats.generated_tokens == 6


def test_stop_string_inside_constrained_output(rt):
    c = rt.generate(PROMPT, max_tokens=120, response_format=schema_format(PERSON), stop=['"age"'])
    assert c.stats.finish_reason == "stop" and c.text.startswith('{"name": ') and '"age"' not in c.text


# ---- decoding under a grammar: exactness and drafts -----------------------------------------------------
class ScriptDrafter(OracleDrafter):
    """Proposes a fixed tree (``beams``) continuing any root; counts its proposals."""

    def __init__(self, beams):
        self.beams = beams
        self.proposed = 0

    def propose(self, ctx, shape):
        self.proposed += 1
        return pack_beams(self.beams)[0]


def run(backend, prompt, grammar, steps_for, **cfg):
    backend.truncate(0)
    stats, out = Stats(), []
    constraint = Constraint.for_backend(backend, grammar)
    forwarded = []
    forward = backend.forward

    def spy(tokens, parents, want_hidden=True):
        forwarded.append(list(tokens))
        return forward(tokens, parents, want_hidden=want_hidden)

    backend.forward = spy
    try:
        text = "".join(stream(backend, prompt, GenerationConfig(**cfg), stats, steps=steps_for(constraint),
                              out_tokens=out))
    finally:
        del backend.forward
    return out, text, stats, forwarded


def exact_controller(backend):
    return controller_for(None, exact_rows=backend.exact_rows, exact_context=backend.exact_context)


def test_forced_batching_and_cut_drafts_change_no_greedy_token(smol):
    grammar = grammar_of(schema_format(PERSON))
    prompt = smol.tokenize(PROMPT)
    plain, text, _, fw = run(smol, prompt, grammar, lambda c: functools.partial(plain_steps, constraint=c),
                             max_tokens=100)
    assert all(len(t) == 1 for t in fw)
    jsonschema_rs.validator_for(PERSON).validate(json.loads(text))
    jump, _, st, fw = run(smol, prompt, grammar, lambda c: speculative_steps(None, exact_controller(smol), c),
                          max_tokens=100)
    assert jump == plain
    assert st.forced > 0 and st.verifies < len(plain) and max(map(len, fw)) > 1
    decoy = smol.tokenize("zzz", add_special=False)[0]  # a sibling the grammar rejects at the first draft level
    # except inside strings
    drafter = OracleDrafter(prompt, plain, decoy=decoy - 1)  # beams: the greedy continuation and [decoy, ...]
    ctl = controller_for(drafter, width=2, fixed_depth=1, exact_rows=smol.exact_rows, exact_context=smol.exact_context)
    spec, _, st, fw = run(smol, prompt, grammar, lambda c: speculative_steps(drafter, ctl, c), max_tokens=100)
    assert spec == plain
    assert st.accepted > 0 and st.pruned > 0


def test_a_draft_the_grammar_rejects_is_never_verified(smol):
    grammar = grammar_of({"type": "regex", "pattern": DATE})
    prompt = smol.tokenize("Today's date is ")
    letters = smol.tokenize(" hello world", add_special=False)
    digit = smol.tokenize("1", add_special=False)
    drafter = ScriptDrafter([letters[:2], digit + letters[:1]])
    ctl = controller_for(drafter, fixed_depth=2)
    out, text, st, fw = run(smol, prompt, grammar, lambda c: speculative_steps(drafter, ctl, c, jump_forward=False),
                            max_tokens=20)
    assert re.fullmatch(DATE, text)
    assert drafter.proposed > 0 and st.pruned > 0
    assert not any(t in letters for batch in fw for t in batch)


def test_prune_maps_rows():
    class Digits:  # a grammar over token ids: digits (0-9) only
        def valid_prefix(self, tokens):
            return next((i for i, t in enumerate(tokens) if t > 9), len(tokens))

    tree = DraftTree([1, 50, 2, 3, 60], [-1, -1, 0, 2, 0])
    cut, rows = prune(tree, Digits())
    assert cut.tokens == [1, 2, 3] and cut.parents == [-1, 0, 1]
    assert rows == [0, 1, -1, 2, 3, -1]


# ---- the acceptance rule on the masked distribution ----------------------------------------------------------
class MaskOnly:
    """A constraint that allows only ``allowed`` at every position."""

    def __init__(self, vocab, allowed):
        self.allow = np.zeros(vocab, dtype=bool)
        self.allow[list(allowed)] = True

    def masked(self, logits):
        return np.where(self.allow, logits, -np.inf)

    def consume(self, tokens):
        pass


def test_sampled_acceptance_keeps_the_masked_distribution():
    """Sampled trees drafted from an unconstrained q (two siblings drawn without replacement, often ones the
    grammar rejects): the first token's frequencies match the masked, renormalized target distribution."""
    rng = np.random.default_rng(0)
    V, sp = 8, SamplingParams(temperature=1.0)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    c = MaskOnly(V, [1, 3, 5, 6])
    q = rng.dirichlet(np.ones(V))
    target = probs(c.masked(logits[0]), sp)
    n, counts = 20000, np.zeros(V)
    for i in range(n):
        kids = [int(t) for t in rng.choice(V, size=2, replace=False, p=q)]
        tree = DraftTree(kids, [-1, -1], [q, q])
        accepted, nxt = accept_sampling(tree, logits, sp, PositionRng(i), 0, c)
        counts[tree.tokens[accepted[0]] if accepted else nxt] += 1
    assert counts[[0, 2, 4, 7]].sum() == 0
    assert 0.5 * np.abs(counts / n - target).sum() < 0.02


# ---- the server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(smol_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from edgespec.server import Server, ServerConfig, create_app
    from tests.conftest import KEY, Served, serve_in_thread

    r = edgespec.load(SMALL, n_ctx=1024, n_threads=2, draft="ngram", exact=True, adapt=False)
    srv = Server(ServerConfig(model_name=SMALL, api_key=KEY, max_queue=4))
    srv.attach(r)
    server, thread, url = serve_in_thread(create_app(srv))
    yield Served(r, srv, url)
    server.should_exit = True
    thread.join(30)
    srv.close()


def test_server_response_format_json_schema(served):
    validator = jsonschema_rs.validator_for(PERSON)
    for seed in (None, 1, 2):
        r = served.client.chat.completions.create(
            model=SMALL, messages=[{"role": "user", "content": PROMPT}], max_tokens=120, seed=seed,
            temperature=0 if seed is None else 0.9, response_format=schema_format(PERSON))
        validator.validate(json.loads(r.choices[0].message.content))
        assert r.choices[0].finish_reason == "stop"
    r = served.client.completions.create(model=SMALL, prompt=PROMPT, max_tokens=120, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_server_llama_server_fields(served):
    r = served.http.post("/v1/completions", json={"prompt": "The date: ", "max_tokens": 16, "temperature": 0,
                                                  "grammar": 'root ::= [0-9]{4} "-" [0-9]{2} "-" [0-9]{2}'})
    assert r.status_code == 200, r.text
    assert re.fullmatch(DATE, r.json()["choices"][0]["text"])
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                       "max_tokens": 120, "temperature": 0, "json_schema": PERSON})
    assert r.status_code == 200, r.text
    jsonschema_rs.validator_for(PERSON).validate(json.loads(r.json()["choices"][0]["message"]["content"]))


@pytest.mark.parametrize("body,param,named", [
    ({"response_format": schema_format({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "regex", "pattern": "[a-"}}, "response_format", "unclosed"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"json_schema": {"type": "strin"}}, "json_schema", "strin"),
    ({"grammar": 'root ::= "a" missing'}, "grammar", "missing"),
    ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "grammar", "not both"),
])
def test_server_invalid_formats_get_400_naming_them(served, body, param, named):
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and named in err["message"]
    with pytest.raises(openai.BadRequestError):
        served.client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              response_format=schema_format({"type": "array", "uniqueItems": True}))


# ---- tool calls with strict schemas ------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def qwen_rt(qwen_path):
    from tests.conftest import QWEN

    r = edgespec.load(QWEN, n_ctx=2048, n_threads=2, draft="ngram", adapt=False)
    yield r
    r.close()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_strict_tool_calls_follow_the_schema(qwen_rt, choice):
    from edgespec import tools as toolcalls
    from edgespec.api_models import ChatRequest
    from edgespec.server_prepare import prepare_chat

    body = ChatRequest.model_validate({
        "messages": [{"role": "user", "content": "Is it warm in Valencia today? Use Fahrenheit."}],
        "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 80, "temperature": 0})
    prep = prepare_chat(qwen_rt, body)
    assert prep.req._grammar is not None
    text = qwen_rt.start(prep.tokens, prep.req).text()
    _, calls = toolcalls.parse(prep.prefix + text, prep.tools)
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather", text
    jsonschema_rs.validator_for(WEATHER["function"]["parameters"]).validate(
        json.loads(calls[0]["function"]["arguments"]))


def test_a_strict_tool_the_engine_cannot_enforce_is_a_400(qwen_rt):
    from edgespec.api_models import ChatRequest
    from edgespec.server_openai import APIError
    from edgespec.server_prepare import prepare_chat

    bad = {"type": "function", "function": {"name": "f", "strict": True,
                                            "parameters": {"type": "array", "uniqueItems": True}}}
    body = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": [bad],
                                       "tool_choice": "required", "max_tokens": 8})
    with pytest.raises(APIError) as e:
        prepare_chat(qwen_rt, body)
    assert e.value.status == 400 and e.value.param == "tools" and "uniqueItems" in e.value.message


def test_mlx_backend_constrained(smol_path):
    """The mask is applied where edgespec samples (numpy rows from either backend): MLX on the CPU build."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from edgespec.backends.mlx_backend import MlxBackend

    mb = MlxBackend(smol_path, n_ctx=512, bits="gguf", progress=False)
    try:
        grammar = grammar_of({"type": "regex", "pattern": DATE})
        prompt = mb.tokenize("The first moon landing was on ")
        plain, text, _, _ = run(mb, prompt, grammar, lambda c: functools.partial(plain_steps, constraint=c),
                                max_tokens=16)
        assert re.fullmatch(DATE, text)
        ctl = controller_for(None)
        jump, _, st, _ = run(mb, prompt, grammar, lambda c: speculative_steps(None, ctl, c), max_tokens=16)
        assert re.fullmatch(DATE, detokenize(mb, jump))  # (batched rows may part from plain at a near-tie)
        assert st.forced > 0
    finally:
        mb.close()


def test_bench_set_compiles_and_summarizes():
    from edgespec.benches.structured import Answer, summarize, validator
    from edgespec.benches.structured_tasks import TASKS

    assert len(TASKS) >= 20 and len({t.name for t in TASKS}) == len(TASKS)
    kinds = {t.response_format["type"] for t in TASKS}
    assert kinds == {"json_schema", "json_object", "regex"}
    for t in TASKS:
        grammar_of(t.response_format)
    date = next(t for t in TASKS if t.name == "regex-date")
    assert validator(date)("2024-03-18") and not validator(date)("March 18")
    answers = [Answer("plain", "a", None, "x", 10, 10.0, True, 0, 0.2), Answer("default", "a", None, "x", 10, 15.0,
                                                                               True, 4, 0.3),
               Answer("llama-python", "a", None, "y", 10, 12.0, False)]
    s = summarize(answers)
    assert s["default"]["median_speedup_vs_plain"] == 1.5
    assert s["default"]["median_speedup_vs_llama_python"] == 1.25 and s["llama-python"]["valid"] == 0.0


def test_bench_certifies_greedy_differences_at_the_first_differing_token():
    """Greedy ``default`` answers are compared with ``plain`` token by token; a difference is a near-tie only where
    plain decoding's constrained margin at the first differing token (or the shorter end) is below NEAR_TIE."""
    from edgespec.benches.speed import NEAR_TIE
    from edgespec.benches.structured import Answer, check_greedy
    from edgespec.benches.structured_tasks import TASKS

    class Margins:
        def __init__(self):
            self.asked = []

        def margin_at(self, task, plain, i):
            self.asked.append((task.name, i))
            return {"t1": NEAR_TIE / 2, "t2": NEAR_TIE * 2}.get(task.name, 0.0)

    tasks = [dataclasses.replace(TASKS[0], name=n) for n in ("t0", "t1", "t2", "t3")]
    ids = {"t0": ([1, 2, 3], [1, 2, 3]), "t1": ([1, 2, 3], [1, 5, 3]), "t2": ([1, 2], [1, 2, 3]), "t3": ([], [])}
    answers = [Answer(m, n, seed, "", 0, 1.0, True, ids=ids[n][k]) for n in ids for k, m in enumerate(("default",
                                                                                                       "plain"))
               for seed in (None, 1)]
    runner = Margins()
    out = check_greedy(runner, tasks, answers)
    assert runner.asked == [("t1", 1), ("t2", 2)]
    assert out["identical"] == 2 and out["compared"] == 4
    assert [t["task"] for t in out["near_ties"]] == ["t1"] and [t["task"] for t in out["mismatches"]] == ["t2"]


def test_server_bench_sends_tool_tasks_as_strict_tools():
    """The server bench asks the tool-call tasks through ``tools`` (strict, the name the task's schema pins, its
    arguments' schema) and every other task through ``response_format``."""
    from edgespec.benches.structured import validator
    from edgespec.benches.structured_server import tool_of
    from edgespec.benches.structured_tasks import TASKS

    tools = {t.name: tool_of(t) for t in TASKS}
    assert {n for n, tool in tools.items() if tool} == {t.name for t in TASKS if t.name.startswith("tool-")}
    weather = next(t for t in TASKS if t.name == "tool-weather")
    fn = tools["tool-weather"]["function"]
    assert fn["name"] == "get_weather" and fn["strict"] is True
    assert fn["parameters"] == weather.schema["properties"]["arguments"]
    call = {"name": "get_weather", "arguments": {"city": "Valencia", "day": "tomorrow", "unit": "celsius"}}
    assert validator(weather)(json.dumps(call))
    assert not validator(weather)(json.dumps(dict(call, name="get_time")))
