"""Stop strings: capped in number and length (a ValueError naming ``stop``), and matched incrementally: the
work per token does not grow with the length of the answer or of the stop strings (counted in Python line
events, not timed). A fake backend whose tokens are characters keeps it model-free."""

from __future__ import annotations

import random
import sys

import pytest

from edgespec import generate
from edgespec.generate import MAX_STOP_CHARS, MAX_STOPS, TextOut
from edgespec.options import Request


class CharBackend:
    """Token t is the character chr(t)."""

    def token_bytes(self, token: int) -> bytes:
        return chr(token).encode()


def run(text: str, stop: tuple[str, ...]) -> tuple[str, list[str], bool]:
    out = TextOut(CharBackend(), stop)
    chunks = []
    for c in text:
        chunks.append(out.push(ord(c)))
        if out.stopped:
            break
    chunks.append(out.finish())
    return "".join(chunks), chunks, out.stopped


def reference(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The answer is cut at the first stop string completed, at the earliest start among those completed by the
    same character."""
    for end in range(1, len(text) + 1):
        starts = [text.find(s, 0, end) for s in stop]
        starts = [i for i in starts if i >= 0]
        if starts:
            return text[:min(starts)], True
    return text, False


def test_caps_are_value_errors_naming_stop():
    with pytest.raises(ValueError, match="^stop"):
        Request(stop=["x" * (MAX_STOP_CHARS + 1)])
    with pytest.raises(ValueError, match="^stop"):
        Request(stop=[f"s{i}" for i in range(MAX_STOPS + 1)])
    with pytest.raises(ValueError, match="^stop"):
        Request(stop=["ok", ""])
    Request(stop=["y" * MAX_STOP_CHARS] * MAX_STOPS)  # at the caps: accepted


def test_matches_like_a_whole_text_search_and_never_emits_a_stop_prefix():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        stop = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        got, chunks, stopped = run(text, stop)
        assert (got, stopped) == reference(text, stop), (text, stop)
        emitted = ""
        for c in chunks[:-1]:  # nothing emitted is taken back
            emitted += c
            assert got.startswith(emitted)


def _line_events(fn) -> int:
    """Python line events inside generate.py while ``fn`` runs: a count of the work done, not a time."""
    n = 0

    def tracer(frame, event, arg):
        nonlocal n
        if frame.f_code.co_filename == generate.__file__:
            if event == "line":
                n += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return n


def test_work_per_token_does_not_grow_with_stop_length():
    """The old matcher built every prefix of every stop string at each token: 4 strings of 512 characters
    over 300 tokens took ~600,000 steps. Reading each new character once per stop string takes a few."""
    stop = tuple("a" * (MAX_STOP_CHARS - 1) + c for c in "bcde")  # long near-misses on a text of "a"s
    text = "a" * 300
    n = _line_events(lambda: run(text, stop))
    assert n < 20 * (len(text) * len(stop) + sum(map(len, stop))), n  # once per stop character, once per token
    got, _, stopped = run(text + "a" * 300 + "e", stop)
    assert stopped and got == "a" * (600 - MAX_STOP_CHARS + 1)
