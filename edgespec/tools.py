"""Tool calls in the Hermes/Qwen2.5 format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the
model's text, turned into OpenAI ``tool_calls`` (whole, or incrementally while streaming).

The tools themselves reach the model through its own chat template (``render(..., tools=)``); this module
only reads the answer. A block whose JSON does not parse, or has no name, stays in the text as content.
Small models often drop the tags and answer with the bare object: an answer that is exactly one JSON object
naming one of the request's tools is read as a call too (while streaming, an answer that starts with ``{`` is
held back to its end to decide).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_call(body: str, names: frozenset[str] | None = None) -> dict | None:
    """One ``<tool_call>`` body -> an OpenAI tool call (arguments as a JSON string), or None. ``names``: the
    tool names it must use (None: any)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    try:
        if isinstance(args, str):  # already a JSON string: keep it if it is valid JSON
            json.loads(args)
        else:
            args = json.dumps(args, ensure_ascii=False)
        args.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the model's JSON): escaped, still the same JSON
        args = json.dumps(json.loads(args))
    except (ValueError, RecursionError):
        return None
    return {"id": call_id(), "type": "function", "function": {"name": obj["name"], "arguments": args}}


def parse(text: str, names: frozenset[str] | None = None) -> tuple[str, list[dict]]:
    """Split a whole answer into content (text outside parsed tool calls) and tool calls. ``names``: the
    request's tool names (a bare JSON answer must name one of them)."""
    stream = ToolStream(names)
    events = stream.push(text) + stream.finish()
    content = "".join(v for k, v in events if k == "content")
    return content, [v for k, v in events if k == "tool_call"]


@dataclass
class ToolStream:
    """Incremental reader: text chunks in, ("content", str) and ("tool_call", dict) events out. Text that may
    be the start of ``<tool_call>`` is held back until it is known not to be."""

    names: frozenset[str] | None = None  # the request's tools; None: no bare-JSON calls
    buf: str = ""
    inside: bool = False
    bare: bool | None = None  # the answer is a bare JSON object (None: not known yet)
    calls: list[dict] = field(default_factory=list)

    def push(self, chunk: str) -> list[tuple[str, object]]:
        self.buf += chunk
        out: list[tuple[str, object]] = []
        if self.bare is None and self.names:
            head = self.buf.lstrip()
            if not head:
                return out
            self.bare = head.startswith("{")
        if self.bare:
            return out  # decided at the end
        while True:
            if not self.inside:
                i = self.buf.find(OPEN)
                if i < 0:
                    hold = max((k for k in range(1, len(OPEN)) if self.buf.endswith(OPEN[:k])), default=0)
                    text, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
                    if text:
                        out.append(("content", text))
                    return out
                if i:
                    out.append(("content", self.buf[:i]))
                self.buf, self.inside = self.buf[i + len(OPEN):], True
            else:
                j = self.buf.find(CLOSE)
                if j < 0:
                    return out
                body, self.buf, self.inside = self.buf[:j], self.buf[j + len(CLOSE):], False
                out.append(self._call(body))

    def finish(self) -> list[tuple[str, object]]:
        """The end of the answer: an unclosed block is parsed if it can be (a model may stop at EOS right
        after the JSON), else returned as content."""
        rest, self.buf = self.buf, ""
        if self.bare:
            call = parse_call(rest.strip(), self.names)
            if call is not None:
                self.calls.append(call)
                return [("tool_call", call)]
            self.bare = False
            self.buf = rest
            return self.push("") + self.finish()
        if self.inside:
            self.inside = False
            return [self._call(rest)] if rest.strip() else [("content", OPEN)]
        return [("content", rest)] if rest else []

    def _call(self, body: str) -> tuple[str, object]:
        call = parse_call(body.strip(), self.names)  # a name the client did not declare stays text
        if call is None:
            return ("content", OPEN + body + CLOSE)
        self.calls.append(call)
        return ("tool_call", call)


def forced_prefix(tool_choice, template: str | None) -> str:
    """Text the answer is made to start with so that the model calls a tool: ``required`` opens a tool call,
    a named function also writes its name. Empty for ``auto``/``none`` or a template without ``<tool_call>``."""
    if tool_choice in (None, "auto", "none") or not template or OPEN not in template:
        return ""
    if tool_choice == "required":
        return OPEN + "\n"
    name = tool_choice["function"]["name"]
    return OPEN + "\n" + '{"name": ' + json.dumps(name) + ', "arguments": '


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates expect them: content always a string, tool-call arguments as objects
    (templates write them with ``tojson``)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except (ValueError, RecursionError):  # kept as the string it is
                        pass
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out
