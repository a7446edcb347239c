"""A multi-turn chat session over one Runtime: history, KV-cache reuse across turns, context policy.

Each turn renders the whole conversation through the chat template, but the backend keeps the KV
cache of the previous turn, so only the tokens after the common prefix are evaluated. When the
conversation no longer fits the context, the oldest turns are dropped (the system prompt stays);
``dropped`` counts them and the CLI says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgespec.generate import Stats
from edgespec.options import Request, as_request

if TYPE_CHECKING:
    from edgespec.runtime import Runtime


class ChatSession:
    def __init__(self, runtime: Runtime, system: str | None = None):
        self.runtime = runtime
        self.system = system
        self.messages: list[dict] = []
        self.dropped = 0
        self.last_stats: Stats | None = None
        self.turns: list[Stats] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.dropped = 0

    def send(self, text: str, request: Request | None = None, **options) -> Iterator[str]:
        """Stream the reply to ``text``. The (possibly partial, if cancelled) reply joins the history.
        Bad options and a conversation that cannot fit raise here, before anything is generated."""
        req = as_request(request, options)
        rt = self.runtime
        msgs = self.messages + [{"role": "user", "content": text}]
        tokens, dropped = rt.fit_chat(msgs, req)
        gen = rt.start(tokens, req, dropped)
        if dropped:
            head = 1 if msgs[0]["role"] == "system" else 0
            del msgs[head:head + dropped]
            self.dropped += dropped
        self.messages = msgs
        return self._run(gen)

    def _run(self, gen) -> Iterator[str]:
        reply = []
        try:
            for chunk in gen:
                reply.append(chunk)
                yield chunk
        finally:
            gen.close()
            if reply:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            else:  # nothing was answered (error or immediate cancel): forget the question too
                self.messages.pop()
            if gen.stats.finish_reason:
                self.last_stats = gen.stats
                self.turns.append(gen.stats)
