"""A conversation as prompt tokens where message contents are text: the chat template's own markers
(``<|im_start|>``, ``<|im_end|>``) are special tokens, while the same characters inside a message, a system
prompt or a tool result are tokenized as literal text, so that no content can forge a turn.

The template is rendered twice: with each client string replaced by a unique sentinel (which splits the
prompt into template pieces and content pieces) and with the real strings (which checks that the template put
each string in as it is, or trimmed). When no content holds the text of a special token, the whole text is
tokenized at once (the prompt is exactly as before); otherwise template pieces are tokenized with special
tokens parsed and content pieces without.
"""

from __future__ import annotations

import re
import secrets

from edgespec.backends.base import Backend
from edgespec.backends.chat_template import render
from edgespec.generate import PromptTooLongError


class RenderError(ValueError):
    """The chat template could not render the conversation (``Runtime.encode_chat`` raises it as
    ``TemplateError``)."""


def _render(info, messages: list[dict], tools: list[dict] | None) -> str:
    try:
        return render(info.chat_template, messages, info.bos_text, info.eos_text, add_generation_prompt=True,
                      tools=tools)
    except (ValueError, TypeError) as e:
        raise RenderError(str(e)) from e
    except Exception as e:  # jinja2's TemplateError and anything a template raises
        raise RenderError(f"the chat template of {info.name} failed to render: {type(e).__name__}: {e}") from e


# the message fields a template writes as they are (tool-call arguments go through ``tojson``, which escapes
# ``<`` and ``>``)
_FIELDS = ("content", "name", "tool_call_id")


def _with_sentinels(messages: list[dict], mark: str) -> tuple[list[dict], list[str]]:
    """A copy of ``messages`` with each client string replaced by ``{mark}{i}Z``, and the strings by ``i``."""
    values: list[str] = []

    def sub(v):
        if not isinstance(v, str) or not v:
            return v
        values.append(v)
        return f"{mark}{len(values) - 1}Z"

    out = []
    for m in messages:
        m = dict(m)
        for k in _FIELDS:
            if k in m:
                m[k] = sub(m[k])
        if isinstance(m.get("tool_calls"), list):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c) if isinstance(c, dict) else c
                if isinstance(c, dict) and isinstance(c.get("function"), dict) and "name" in c["function"]:
                    c["function"] = {**c["function"], "name": sub(c["function"]["name"])}
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out, values


def _align(real: str, marked: str, pattern: re.Pattern, values: list[str]) -> list[tuple[str, bool]] | None:
    """Pieces ``(text, is_content)`` whose concatenation is ``real``, or None if the template changed a
    string other than by trimming it (then the pieces cannot be told apart)."""
    parts = pattern.split(marked)  # template, index, template, index, ..., template
    out: list[tuple[str, bool]] = []
    pos = 0
    for j in range(0, len(parts), 2):
        t = parts[j]
        if not real.startswith(t, pos):
            return None
        if t:
            out.append((t, False))
        pos += len(t)
        if j + 1 == len(parts):
            break
        v, after = values[int(parts[j + 1])], parts[j + 2]
        for cand in (v, v.strip(), v.lstrip(), v.rstrip()):
            if real.startswith(cand, pos) and real.startswith(after, pos + len(cand)):
                break
        else:
            return None
        if cand:
            out.append((cand, True))
        pos += len(cand)
    return out if pos == len(real) else None


def chat_tokens(backend: Backend, messages: list[dict], tools: list[dict] | None = None,
                limit: int | None = None) -> list[int]:
    """The prompt tokens of ``messages`` (with the generation prompt), contents tokenized as text.
    ``limit``: raise ``PromptTooLongError`` as soon as the prompt has more tokens than that, before the rest
    is tokenized. ``RenderError`` when the template fails (or rewrites a content that holds control tokens)."""
    info = backend.info
    mark = "ESMARK" + secrets.token_hex(8)
    marked_msgs, values = _with_sentinels(messages, mark)
    real = _render(info, messages, tools)
    pattern = re.compile(mark + r"(\d+)Z")
    pieces = _align(real, _render(info, marked_msgs, tools), pattern, values) if values else None
    add_special = not (info.bos_text and real.startswith(info.bos_text))
    if pieces is None:
        # the template rewrote a string: tokenize the whole text, unless a string holds special tokens
        if any(_has_special(backend, v) for v in values):
            raise RenderError("a message holds control tokens (such as an end-of-turn marker) and this "
                             "model's chat template rewrites message contents, so they cannot be kept as text")
        pieces = [(real, False)]
    n = 0
    for text, is_content in pieces:  # contents first: a prompt too long is refused before the rest
        if is_content:
            n += len(backend.tokenize(text, add_special=False, parse_special=False))
            _check(backend, n, limit)
    if not any(is_content and _has_special(backend, text) for text, is_content in pieces):
        # no control text in any content: the whole text at once (exactly the tokens the model was trained on;
        # pieces tokenized apart could split differently where a content meets the template's text)
        tokens = backend.tokenize(real, add_special=add_special, parse_special=True)
        _check(backend, len(tokens), limit)
        return tokens
    tokens = backend.tokenize("", add_special=add_special, parse_special=False) if add_special else []
    for text, is_content in pieces:
        tokens += backend.tokenize(text, add_special=False, parse_special=not is_content)
        _check(backend, len(tokens), limit)
    return tokens


def _has_special(backend: Backend, text: str) -> bool:
    """Does ``text`` hold the text of a special token (``<|im_end|>``)?"""
    return backend.tokenize(text, False, True) != backend.tokenize(text, False, False)


def _check(backend: Backend, n: int, limit: int | None) -> None:
    if limit is not None and n > limit:
        raise PromptTooLongError(f"the prompt has more than {limit} tokens (the context holds {backend.n_ctx}); "
                                 "shorten it")
