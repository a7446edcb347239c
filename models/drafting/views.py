"""Spellings of a request's text that its tokens do not hold, for the suffix drafter to copy from.

An agent that has read a file writes it back inside a JSON tool call (``write_file``, ``edit``): the same lines
with their newlines, quotes and backslashes escaped. The request holds the file raw, so a draft copied from it
stops at every line end. ``JsonViews`` gives the suffix drafter the JSON-escaped spelling of every span of the
prompt's text between two control tokens (a message, a tool result) that escaping changes, tokenized as plain
text the way the model writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_CHARS = 64  # shorter spans are not worth a document (a JSON key, a file name)
MAX_CHARS = 1 << 17  # escaped characters tokenized per prompt, at most (a 4k-token context holds ~16k characters)


@dataclass
class JsonViews:
    """``tokenize(text)`` -> plain-text tokens (no special tokens); ``piece(token)`` -> the token's bytes (none
    for a control token). The spans of the last prompt are kept tokenized: a conversation that grows by a turn
    costs the tokenizing of that turn only, and its earlier views are the same lists as before."""

    tokenize: Callable[[str], list[int]]
    piece: Callable[[int], bytes]
    min_chars: int = MIN_CHARS
    max_chars: int = MAX_CHARS
    _last: dict[str, list[int]] = field(default_factory=dict)  # escaped span -> its tokens

    def __call__(self, tokens: list[int]) -> list[list[int]]:
        """The escaped spelling of each span of ``tokens`` that escaping changes, as token lists in the text's
        order (``max_chars`` escaped characters at most, the newest: escaping can make a text six times longer)."""
        spans, span = [], bytearray()
        for t in tokens:
            b = self.piece(t)
            if b:
                span += b
            elif span:
                spans.append(bytes(span))
                span.clear()
        if span:
            spans.append(bytes(span))
        out, left, seen = [], self.max_chars, {}
        for raw in reversed(spans):  # the newest text first: it is the likeliest to be written back
            if len(raw) < self.min_chars:  # (bytes: at least as many as characters)
                continue
            text = raw.decode("utf-8", "replace")[-left:]
            escaped = json.dumps(text, ensure_ascii=False)[1:-1][-left:]
            doc = self._last.get(escaped)
            if doc is None:
                doc = self.tokenize(escaped) if escaped != text else []
            seen[escaped] = doc
            if doc:
                out.append(doc)
            left -= len(escaped)
            if left <= 0:
                break
        self._last = seen
        return out[::-1]


def json_views(backend) -> JsonViews:
    """The JSON-escaped views of a backend's prompts (its tokenizer, its tokens' bytes)."""
    return JsonViews(lambda text: backend.tokenize(text, add_special=False, parse_special=False), backend.token_bytes)
