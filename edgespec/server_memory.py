"""The server's memory admission under ``--memory-budget``: a request's own bytes (its body, its token lists, a
prediction's index, its answer) are estimated once it is prepared and checked against the live headroom; a
request the headroom cannot take now gets 503 with Retry-After instead of pushing the process over its budget.
Each of those bytes is bounded beforehand by the request limits (``--max-body``, the context, ``max_tokens``)."""

from __future__ import annotations

from collections.abc import Callable

TOKEN_BYTES = 36  # one token in a Python list: an 8-byte pointer and a 28-byte int object


def request_bytes(body_bytes: int, prompt_tokens: int, max_tokens: int, drafter_bytes: int = 0) -> int:
    """Bytes a request holds while it runs: its body (read, then parsed: about twice), its prompt's tokens (the
    request's list, the runtime's and the cache's copies), its answer's tokens and text, a prediction's index."""
    return 2 * body_bytes + 3 * TOKEN_BYTES * prompt_tokens + (TOKEN_BYTES + 8) * max_tokens + drafter_bytes


def shortfall(headroom: Callable[[], int] | None, need: int) -> int:
    """Bytes the live headroom lacks for ``need`` more (0: it fits, or there is no budget)."""
    if headroom is None:
        return 0
    return max(0, need - headroom())
