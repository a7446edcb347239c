"""The server's model-free parts: the prompt cache's policy (on a fake backend), tool-call parsing, the
prediction drafter's alignment."""

from __future__ import annotations

import json

from edgespec.backends.base import KVState
from edgespec.models.drafting.drafter import DraftContext, TreeShape, VerifyResult
from edgespec.models.drafting.prediction import PredictionDrafter
from edgespec.prompt_cache import PromptCache, PromptCacheConfig
from edgespec.tools import ToolStream, forced_prefix, parse, template_messages


class FakeBackend:
    """Just a token list; a state costs 10 bytes per token."""

    def __init__(self):
        self.cached: list[int] = []
        self.loads = 0
        self.saves = 0  # states copied

    def save_state(self) -> KVState:
        self.saves += 1
        return KVState(list(self.cached), None, 10 * len(self.cached))

    def memory(self):
        from types import SimpleNamespace

        return SimpleNamespace(kv_bytes_per_token=10)

    def truncate(self, n: int) -> None:
        self.cached = self.cached[:n]

    def load_state(self, state: KVState) -> None:
        self.cached = list(state.tokens)
        self.loads += 1

    def run(self, prompt: list[int], cache: PromptCache, out: int = 5) -> int:
        """A request: the hook, then prefill from the common prefix, then ``out`` generated tokens. Returns
        how many prompt tokens came from the cache."""
        cache.before(self, prompt)
        n = 0
        while n < min(len(self.cached), len(prompt) - 1) and self.cached[n] == prompt[n]:
            n += 1
        self.cached = prompt + [9000 + i for i in range(out)]
        cache.after(self)
        return n


def conv(k: int, n: int) -> list[int]:
    return [1] + [100 * k + i % 97 for i in range(n)]  # shares only the first token with other conversations


def test_switching_restores_each_conversation():
    b, cache = FakeBackend(), PromptCache(PromptCacheConfig(min_tokens=8))
    a1, c1 = conv(1, 60), conv(2, 60)
    assert b.run(a1, cache) == 0
    assert b.run(c1, cache) == 1  # only the shared first token: a1's state was saved on the way out
    a2 = a1 + [9000 + i for i in range(5)] + [7, 7, 7]
    assert b.run(a2, cache) >= len(a1)  # restored
    c2 = c1 + [9000 + i for i in range(5)] + [8, 8]
    assert b.run(c2, cache) >= len(c1)
    assert cache.stats.hits == 2 and b.loads == 2
    assert len(cache) == 2  # a's older state was superseded by its longer one


def test_continuing_a_conversation_saves_nothing():
    b, cache = FakeBackend(), PromptCache(PromptCacheConfig(min_tokens=8))
    p = conv(1, 50)
    for _ in range(4):
        b.run(p, cache)
        p = b.cached + [5, 5, 5]
    assert len(cache) == 0 and cache.stats.saves == 0


def test_lru_eviction_under_entries_and_bytes():
    b = FakeBackend()
    cache = PromptCache(PromptCacheConfig(max_entries=3, max_bytes=10 * 250, min_tokens=8))
    for k in range(1, 6):  # five conversations of ~65 tokens (650 bytes each with the answer)
        b.run(conv(k, 60), cache)
    assert len(cache) <= 3 and cache.nbytes <= 2500
    kept = {e.tokens[1] // 100 for e in cache.entries.values()}
    assert kept == {2, 3, 4}  # the most recent ones (5 is live, not saved)
    assert cache.stats.evictions >= 1
    big, b = PromptCache(PromptCacheConfig(max_bytes=100, min_tokens=8)), FakeBackend()
    b.run(conv(1, 60), big)
    b.run(conv(2, 60), big)
    assert len(big) == 0 and big.stats.skipped == 1  # larger than the cap: not kept


def test_restoring_a_state_that_the_save_before_it_evicts():
    """A switch saves the live state first; when that save evicts the very entry to restore (full cache), the
    restore still happens (the server bench hit a KeyError here)."""
    b = FakeBackend()
    cache = PromptCache(PromptCacheConfig(max_entries=1, min_tokens=8))
    a, c = conv(1, 60), conv(2, 60)
    b.run(a, cache)
    b.run(c, cache)  # a saved: the only entry
    assert b.run(a + [9000 + i for i in range(5)] + [7], cache) >= len(a)  # saving c evicts a, a is restored
    assert b.loads == 1 and cache.stats.hits == 1


def test_headroom_refuses_a_save():
    b = FakeBackend()
    cache = PromptCache(PromptCacheConfig(min_tokens=8), headroom=lambda: 100)
    b.run(conv(1, 60), cache)
    b.run(conv(2, 60), cache)
    assert len(cache) == 0 and cache.stats.skipped == 1


def test_tool_calls_whole_and_streamed():
    names = frozenset({"get_weather"})
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse(text, names)
    assert content == "Let me check.\n" and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    stream, events = ToolStream(names), []
    for ch in text:
        events += stream.push(ch)
    events += stream.finish()
    assert "".join(v for k, v in events if k == "content") == "Let me check.\n"
    assert [v["function"]["name"] for k, v in events if k == "tool_call"] == ["get_weather"]
    assert parse('{"name": "get_weather", "arguments": {"city": "Rome"}}', names)[1]  # bare JSON naming a tool
    assert not parse('{"name": "other", "arguments": {}}', names)[1]
    assert parse("<tool_call>{not json}</tool_call>", names) == ("<tool_call>{not json}</tool_call>", [])
    assert parse("a < b and <tool_c", names) == ("a < b and <tool_c", [])
    assert forced_prefix({"type": "function", "function": {"name": "f"}}, "<tool_call>").endswith('"arguments": ')
    assert forced_prefix("auto", "<tool_call>") == "" and forced_prefix("required", None) == ""
    msgs = template_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}])
    assert msgs[0]["content"] == "" and msgs[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}


def test_prediction_drafter_follows_the_prediction_and_rejoins_after_an_edit():
    pred = list(range(100, 160))
    d = PredictionDrafter(pred)
    d.reset()
    shape = TreeShape(depth=4, max_nodes=4)
    prompt = [1, 2, 3]
    out = [100]  # the output starts like the prediction
    tree = d.propose(DraftContext(prompt, out[-1], None, None), shape)
    assert tree.tokens == [101, 102, 103, 104]
    d.observe(VerifyResult(tree, [0, 1, 2, 3], 105))
    out += [101, 102, 103, 104, 105]
    tree = d.propose(DraftContext(prompt + out[:-1], out[-1], None, None), shape)
    assert tree.tokens == [106, 107, 108, 109]
    d.observe(VerifyResult(tree, [0], 999))  # the edit: the target writes something else
    out += [106, 999]
    assert d.accepted_tokens == 5 and d.rejected_tokens == 3
    out += [998, 110, 111, 112]  # ... and joins the prediction again
    tree = d.propose(DraftContext(prompt + out[:-1], out[-1], None, None), shape)
    assert tree.tokens[:2] == [113, 114]


def test_prediction_drafts_a_long_chain_where_the_first_extra_row_is_dear():
    """c(n) as measured for qwen2.5-coder-0.5b on an AMD EPYC (Zen 5, 2 cores): the second row costs 1.5
    steps, later ones ~0.2-0.5. A confident prediction still pays as a chain of 16 (its first node alone
    would not); a prediction that no output follows costs nothing."""
    c = [1.0, 2.5, 3.0, 3.4, 3.7, 3.9, 4.1, 4.3, 4.5, 4.65, 4.8, 4.95, 5.1, 5.25, 5.4, 5.55, 5.7]
    steep = TreeShape(depth=16, max_nodes=16, node_cost=tuple(b - a for a, b in zip(c[:-1], c[1:], strict=True)))
    pred = list(range(100, 160))
    d = PredictionDrafter(pred)
    d.propose(DraftContext([1, 2, 3], 100, None, None), steep)  # the output starts after the prompt [1, 2, 3]
    tree = d.propose(DraftContext([1, 2, 3, 100, 101, 102, 103, 104, 105, 106], 107, None, None), steep)
    assert tree.tokens == list(range(108, 124))
    for k in range(1, 17):
        assert not steep.worth(0.95 ** k, 0)  # node by node, no node would have been drafted
    d.reset()
    assert len(d.propose(DraftContext([1, 2, 3], 7, None, None), steep)) == 0


def test_streamed_text_is_gathered_per_interval_and_ends_before_done():
    """``Job.emit`` from a worker thread: the first piece goes at once, pieces within the interval go together,
    the end comes after all the text; without streaming (interval inf) the text comes whole with the end."""
    import asyncio
    import math
    import threading

    import pytest

    pytest.importorskip("fastapi")
    from edgespec.server import Job

    async def run(interval: float, pause: float) -> list:
        job = Job([], None, asyncio.get_running_loop(), interval=interval)
        first = threading.Event()  # the consumer has the first chunk

        def worker():
            job.emit("chunk", "a")
            if interval < math.inf:
                first.wait(5)
            job.emit("chunk", "b")
            job.emit("chunk", "c")
            threading.Event().wait(pause)
            job.emit("chunk", "d")
            job.emit("done", None)

        threading.Thread(target=worker).start()
        got = []
        while not got or got[-1][0] != "done":
            got.append(await asyncio.wait_for(job.events.get(), 5))
            first.set()
        return got

    assert asyncio.run(run(0.0, 0.0)) == [("chunk", "a"), ("chunk", "b"), ("chunk", "c"), ("chunk", "d"),
                                          ("done", None)]
    assert asyncio.run(run(0.2, 0.5)) == [("chunk", "a"), ("chunk", "bc"), ("chunk", "d"), ("done", None)]
    assert asyncio.run(run(10.0, 0.0)) == [("chunk", "a"), ("chunk", "bcd"), ("done", None)]
    assert asyncio.run(run(math.inf, 0.0)) == [("chunk", "abcd"), ("done", None)]


def test_tool_calls_only_for_declared_names_and_never_unencodable():
    names = frozenset({"get_weather"})
    text = '<tool_call>{"name": "delete_files", "arguments": {"path": "/"}}</tool_call>'
    content, calls = parse(text, names)
    assert calls == [] and content == text  # a name the client never declared stays text
    stream = ToolStream(names)
    assert [k for k, _ in stream.push(text) + stream.finish()] == ["content"]
    # the model may write a lone surrogate as a JSON escape: the arguments stay the same JSON, and encodable
    _, calls = parse('<tool_call>{"name": "get_weather", "arguments": {"city": "\\ud800x"}}</tool_call>', names)
    args = calls[0]["function"]["arguments"]
    args.encode("utf-8")
    assert json.loads(args) == {"city": "\ud800x"}
    deep = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit
    assert parse(f'<tool_call>{{"name": "get_weather", "arguments": {deep}}}</tool_call>', names)[1] == []
    msgs = template_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == deep  # kept as the string it is


def test_json_replies_always_encode():
    import pytest

    pytest.importorskip("fastapi")
    from edgespec.server_openai import SafeJSONResponse, dumps

    assert dumps({"a": "é"}) == '{"a":"é"}'  # non-ASCII as is
    dumps({"a": "\udc80"}).encode("utf-8")  # a lone surrogate escaped
    assert json.loads(SafeJSONResponse({"a": "\ud800"}).body) == {"a": "\ud800"}


def test_guard_helpers():
    import pytest

    pytest.importorskip("fastapi")
    from edgespec.server_guard import allowed_hosts, host_name, is_json, is_loopback, key_matches

    assert host_name("LocalHost:8080") == "localhost" and host_name("[::1]:80") == "[::1]"
    assert host_name("evil.example") == "evil.example"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    hosts = allowed_hosts("127.0.0.1", ("my.box:9000",))
    assert {"localhost", "127.0.0.1", "[::1]", "my.box"} <= hosts and "evil.example" not in hosts
    assert allowed_hosts("0.0.0.0") is None
    assert key_matches("Bearer k1", "k1") and key_matches("bearer k1", "k1")
    assert not key_matches("Bearer k2", "k1") and not key_matches(None, "k1") and not key_matches("Basic k1", "k1")
    assert is_json("application/json; charset=utf-8") and is_json("application/vnd.api+json")
    assert not is_json("text/plain") and not is_json(None) and not is_json("application/x-www-form-urlencoded")


class _IdleRuntime:
    """A runtime the engine never gets to use: the test only admits and queues."""


def test_queue_is_counted_from_the_first_request_and_left_places_are_freed():
    import asyncio

    import pytest

    pytest.importorskip("fastapi")
    from edgespec.server_engine import Engine, Job, QueueFull

    engine = Engine(_IdleRuntime(), max_queue=1)
    engine._stopping = True  # the worker exits: nothing runs, so the counts below are exact
    engine._thread.join(5)
    engine._stopping = False
    a, b = engine.admit(), engine.admit()  # one running and one waiting: nothing has reached the worker yet
    with pytest.raises(QueueFull):
        engine.admit()  # a burst at idle is counted too
    loop = asyncio.new_event_loop()
    job = Job([1], None, loop, ticket=b)
    engine.submit(job)
    assert engine.waiting == 1
    engine.remove(job)  # its client left while it waited
    assert engine.waiting == 0
    c = engine.admit()  # its place is free again
    a.release()
    a.release()  # once only
    engine.admit()
    with pytest.raises(QueueFull):
        engine.admit()
    c.release()
    loop.close()


def test_a_server_reachable_from_other_machines_without_a_key_warns():
    import pytest

    pytest.importorskip("fastapi")
    from edgespec.server import exposure_warning

    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("192.168.1.5", "") is not None
    assert exposure_warning("0.0.0.0", "key") is None and exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("localhost", None) is None


def test_prompt_cache_checks_room_before_copying_and_never_evicts_for_an_oversize_state():
    b = FakeBackend()
    cache = PromptCache(PromptCacheConfig(max_entries=4, max_bytes=1000, min_tokens=8))
    b.run(conv(1, 40), cache)
    b.run(conv(2, 40), cache)  # conversation 1 saved (~450 bytes)
    assert len(cache) == 1 and b.saves == 1
    b.run(conv(3, 200), cache)  # conversation 2 saved
    b.run(conv(4, 20), cache)  # conversation 3 (~2000 bytes) is over the cap: not even copied
    assert b.saves == 2 and cache.stats.skipped == 1
    assert {e.tokens[1] // 100 for e in cache.entries.values()} == {1, 2}  # and nothing was evicted for it
    off = PromptCache(PromptCacheConfig(max_bytes=0, min_tokens=8))
    b = FakeBackend()
    for k in range(1, 5):
        b.run(conv(k, 40), off)
    assert b.saves == 0  # a cap of 0 copies nothing
    tight = PromptCache(PromptCacheConfig(min_tokens=8), headroom=lambda: 100)
    b = FakeBackend()
    b.run(conv(1, 40), tight)
    b.run(conv(2, 40), tight)
    assert b.saves == 0 and tight.stats.skipped == 1  # more than the memory headroom: not copied


def test_prompt_cache_failures_never_fail_the_request():
    class Failing(FakeBackend):
        fail_load = fail_save = False

        def load_state(self, state):
            if self.fail_load:
                self.cached = []  # as llama.cpp's: the cache is cleared before the bytes are set
                raise RuntimeError("llama.cpp could not restore a saved KV state")
            super().load_state(state)

        def save_state(self):
            if self.fail_save:
                raise MemoryError
            return super().save_state()

    b, cache = Failing(), PromptCache(PromptCacheConfig(min_tokens=8))
    a1 = conv(1, 60)
    b.run(a1, cache)
    b.run(conv(2, 60), cache)
    assert len(cache) == 1
    b.fail_load = True
    assert b.run(a1 + [5, 5], cache) == 0  # the request goes on: its whole prompt evaluated again
    kept = lambda: {e.tokens[1] // 100 for e in cache.entries.values()}  # noqa: E731
    assert kept() == {2} and cache.stats.failures == 1  # the state that failed is gone (2 was saved on the way)
    b.fail_load, b.fail_save = False, True
    b.run(conv(3, 60), cache)  # saving a1's cache fails: no error either
    assert kept() == {2} and cache.stats.failures == 2
