"""The embeddable runtime: ``edgespec.load(...)`` returns a ``Runtime`` with ``generate``, ``stream`` and ``chat``.

Thread safety: one model has one KV cache, so requests are serialized with a lock. ``generate`` and
``chat`` hold it for the call; ``stream`` holds it from the first ``next()`` until the iterator is
exhausted or closed, so always finish or ``close()`` a stream. Calls from other threads wait.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgespec import registry
from edgespec.backends.base import Backend
from edgespec.backends.chat_template import render
from edgespec.controller import calibrate, controller_for
from edgespec.generate import Cancel, GenerationConfig, PromptTooLongError, Stats, plain_steps, stream
from edgespec.memory.footprint import node_bytes, read_shape
from edgespec.memory.live import MemoryGuard
from edgespec.memory.planner import SAFETY, drafter_bytes, parse_size
from edgespec.models.drafter import Drafter
from edgespec.models.ngram import NgramDrafter
from edgespec.sampling import SamplingParams
from edgespec.speculative import speculative_steps

if TYPE_CHECKING:
    from edgespec.session import ChatSession

BACKENDS = ("auto", "llama.cpp", "mlx")


@dataclass
class LoadOptions:
    n_ctx: int = 4096
    n_threads: int | None = None
    kv_type: str = "f16"  # f16 | q8_0 | q4_0
    backend: str = "auto"
    draft: str | None = None  # None | "auto" | "ngram" | "redrafter[:<path>]" | "model:<id or path>"
    draft_depth: int | None = None  # fixed draft depth instead of the cost-aware controller
    draft_width: int | None = None  # candidates per node / beams (default: the drafter's own)
    n_batch: int = 512
    adapt: bool = False  # online adaptation of a ReDrafter head on this user's traffic (persisted per user)
    memory_budget: int | str | None = None  # bytes or "1.5GB": plan context/KV/batch/drafter to fit it

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, not {self.n_threads}")


@dataclass
class Completion:
    text: str
    tokens: list[int]
    stats: Stats
    dropped_messages: int = 0  # oldest messages left out so the conversation fits the context


@dataclass
class Request:
    """Per-request generation options, as accepted by ``generate``/``stream``/``chat``."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] = ()
    ignore_eos: bool = False
    cancel: Cancel = None

    def config(self) -> GenerationConfig:
        sp = SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)
        return GenerationConfig(self.max_tokens, sp, tuple(self.stop), self.ignore_eos)


def pick_backend(name: str) -> str:
    """``auto``: MLX on Apple Silicon when it is installed, llama.cpp everywhere else."""
    if name != "auto":
        return name
    if sys.platform == "darwin":
        import platform

        if platform.machine() == "arm64":
            try:
                import mlx.core  # noqa: F401

                return "mlx"
            except ImportError:
                pass
    return "llama.cpp"


def open_backend(path: Path, opts: LoadOptions) -> Backend:
    kind = pick_backend(opts.backend)
    if kind == "mlx":
        try:
            from edgespec.backends.mlx_backend import MlxBackend
        except ImportError as e:
            raise registry.ModelError(
                f"the MLX backend needs `pip install 'edgespec[mlx]'` ({e})") from e
        limit = int(parse_size(opts.memory_budget) * (1 - SAFETY)) if opts.memory_budget else None
        return MlxBackend(path, n_ctx=opts.n_ctx, n_batch=opts.n_batch, memory_limit=limit)
    from edgespec.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(path, n_ctx=opts.n_ctx, n_threads=opts.n_threads, kv_type=opts.kv_type,
                           n_batch=opts.n_batch)


def redrafter_weights(model: str) -> Path | None:
    """Weights for a ReDrafter head on ``model``: the user's own (``edgespec train-drafter``) first, then
    the ones shipped with edgespec."""
    from edgespec.models import redrafter

    name = redrafter.weights_path(registry.model_key(model)).name
    user = registry.cache_dir() / "drafters" / name
    return user if user.exists() else redrafter.shipped(registry.model_key(model))


def resolve_draft(spec: str | None, model: str) -> str | None:
    """``auto``: ReDrafter when weights exist for ``model``, the n-gram drafter otherwise."""
    if spec != "auto":
        return spec
    return "redrafter" if redrafter_weights(model) else "ngram"


def with_adapter(cls, weights: Path, target_path: Path, model: str):
    """A ReDrafter that adapts online, starting from this user's adapted state when a valid one exists."""
    from edgespec.models.online import OnlineAdapter, state_path

    state = state_path(registry.cache_dir(), registry.model_key(model))
    drafter = None
    if state.exists():
        try:
            drafter = cls(state, target_path)
        except ValueError as e:  # corrupt or from another version: start again from the shipped weights
            print(f"edgespec: ignoring adapted drafter state ({e})", file=sys.stderr)
    drafter = drafter or cls(weights, target_path)
    drafter.adapter = OnlineAdapter(drafter, path=state)
    return drafter


def make_drafter(spec: str, target: Backend, opts: LoadOptions, model: str = "") -> Drafter | None:
    """Build a drafter from its name: ``auto`` (ReDrafter when weights exist for ``model``, else n-gram),
    ``ngram``, ``redrafter`` / ``redrafter:<weights.npz>``, ``model:<id or path>`` (same vocabulary) or
    ``xvocab:<id or path>`` (a draft model with another vocabulary)."""
    if spec in ("none", ""):
        return None
    spec = resolve_draft(spec, model)
    if spec == "ngram":
        return NgramDrafter()
    if spec == "redrafter" or spec.startswith("redrafter:"):
        from edgespec.models.redrafter import ReDrafter

        weights = Path(spec.split(":", 1)[1]) if ":" in spec else redrafter_weights(model)
        if weights is None:
            raise registry.ModelError(f"no ReDrafter weights for {model!r}: train one with "
                                      f"`edgespec train-drafter --target {model}` or use --draft ngram")
        return with_adapter(ReDrafter, weights, Path(target.path), model) if opts.adapt else \
            ReDrafter(weights, Path(target.path))
    if spec.startswith("xvocab:"):
        from edgespec.models.cross_vocab import CrossVocabDrafter

        path = registry.resolve(spec[len("xvocab:"):])
        draft_opts = LoadOptions(n_ctx=opts.n_ctx, n_threads=opts.n_threads, backend="llama.cpp")
        return CrossVocabDrafter(open_backend(path, draft_opts), target)
    if spec.startswith("model:"):
        from edgespec.models.draft_model import DraftModelDrafter

        path = registry.resolve(spec[len("model:"):])
        draft_opts = LoadOptions(n_ctx=opts.n_ctx, n_threads=opts.n_threads, kv_type=opts.kv_type, backend=opts.backend)
        return DraftModelDrafter(open_backend(path, draft_opts), target_vocab=target.info.n_vocab)
    raise ValueError(f"unknown drafter {spec!r}: use auto, ngram, redrafter[:<path>], model:<id or path>, "
                     "xvocab:<id or path> or none")


class Runtime:
    def __init__(self, backend: Backend, model: str, drafter: Drafter | None = None,
                 width: int | None = None, fixed_depth: int | None = None):
        self.backend = backend
        self.model = model
        self.lock = threading.RLock()
        self.last_stats: Stats | None = None
        self.drafter = drafter
        costs = None
        if drafter is not None and fixed_depth is None:
            costs = calibrate(backend)  # seed the cost model (~1 s)
            backend.truncate(0)
        self.controller = controller_for(drafter, width, fixed_depth, costs, backend.exact_rows)
        self.plan = None  # the memory plan, when loaded with a budget

    # ---- prompts --------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        info = self.backend.info
        text = render(info.chat_template, messages, info.bos_text, info.eos_text, add_generation_prompt=True)
        add_special = not (info.bos_text and text.startswith(info.bos_text))
        return self.backend.tokenize(text, add_special=add_special, parse_special=True)

    def fit_messages(self, messages: list[dict], reserve: int) -> tuple[list[int], int]:
        """Context policy: drop the oldest non-system messages until the prompt plus ``reserve`` fits.

        The system message and the latest message are always kept; if those alone do not fit,
        ``PromptTooLongError`` is raised. Returns the prompt tokens and how many messages were dropped.
        """
        n_ctx = self.backend.n_ctx
        head = [m for m in messages[:1] if m.get("role") == "system"]
        body = messages[len(head):]
        dropped = 0
        while True:
            tokens = self.encode_chat(head + body)
            if len(tokens) + reserve <= n_ctx or len(body) <= 1:
                break
            drop = 2 if len(body) > 2 and body[0].get("role") == "user" else 1  # a user turn with its reply
            body, dropped = body[drop:], dropped + drop
        if len(tokens) >= n_ctx:
            raise PromptTooLongError(f"the last message needs {len(tokens)} tokens but the context holds {n_ctx}")
        return tokens, dropped

    # ---- generation -----------------------------------------------------------------------------
    def _tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.backend.tokenize(prompt, add_special=True, parse_special=False)
        return list(prompt)

    def stream_tokens(self, tokens: list[int], req: Request, stats: Stats, out: list[int]) -> Iterator[str]:
        with self.lock:
            self.last_stats = stats
            steps = plain_steps if self.drafter is None else speculative_steps(self.drafter, self.controller)
            adapter = getattr(self.drafter, "adapter", None)
            if adapter is not None:
                adapter.busy.set()  # an adaptation step in flight stops at its next step
            try:
                yield from stream(self.backend, tokens, req.config(), stats, steps=steps, cancel=req.cancel,
                                  out_tokens=out, want_hidden=getattr(self.drafter, "needs_hidden", False))
            finally:
                if adapter is not None:
                    adapter.busy.clear()
                    adapter.start()  # learn from this request between requests, in the background

    def stream(self, prompt: str | list[int], **kwargs) -> Iterator[str]:
        """Yield text chunks of a raw completion of ``prompt``; stats land in ``last_stats``."""
        req = Request(**kwargs)
        return self.stream_tokens(self._tokens(prompt), req, Stats(), [])

    def generate(self, prompt: str | list[int], **kwargs) -> Completion:
        """Complete a raw prompt (no chat template)."""
        req, stats, out = Request(**kwargs), Stats(), []
        text = "".join(self.stream_tokens(self._tokens(prompt), req, stats, out))
        return Completion(text, out, stats)

    def chat(self, messages: list[dict], stream: bool = False, **kwargs) -> Completion | Iterator[str]:
        """Answer a conversation ([{"role", "content"}, ...]) through the model's chat template.

        The KV cache is reused for the longest common prefix with the previous request, so a growing
        conversation only evaluates its new tokens. With ``stream=True`` returns an iterator of chunks.
        """
        req, stats, out = Request(**kwargs), Stats(), []
        with self.lock:
            tokens, dropped = self.fit_messages(messages, reserve=min(req.max_tokens, self.backend.n_ctx // 4))
        chunks = self.stream_tokens(tokens, req, stats, out)
        if stream:
            return chunks
        return Completion("".join(chunks), out, stats, dropped)

    def session(self, system: str | None = None) -> ChatSession:
        from edgespec.session import ChatSession

        return ChatSession(self, system)

    def memory(self):
        return self.backend.memory()

    def memory_stats(self) -> dict:
        """Live memory figures: resident set, peak, budget and headroom, KV use, drafter footprint."""
        from edgespec.memory.live import peak_rss_bytes, rss_bytes

        m = self.backend.memory()
        out = {"rss": rss_bytes(), "peak_rss": peak_rss_bytes(), "kv_used": m.kv_used_bytes,
               "kv_reserved": m.kv_reserved_bytes, "weights": m.weights_bytes, "n_cached": m.n_cached, "n_ctx": m.n_ctx,
               "drafter": self.drafter.footprint()["now"] if self.drafter is not None else 0}
        if self.controller.memory is not None:
            out.update(self.controller.memory.figures())
        return out

    def close(self) -> None:
        with self.lock:
            self.backend.close()
            if self.drafter is not None:
                self.drafter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(model: str = registry.DEFAULT_MODEL, **options) -> Runtime:
    """Load a model by registry id or ``.gguf`` path (downloading a registry model on first use).

    Options: n_ctx, n_threads, kv_type (f16|q8_0|q4_0), backend (auto|llama.cpp|mlx), draft (None,
    "auto", "ngram", "redrafter" or "model:<id>"), draft_depth (fix the depth instead of the cost-aware controller),
    draft_width.
    """
    opts = LoadOptions(**options)
    path = registry.resolve(model)
    budget = None
    if opts.memory_budget is not None:
        opts, budget = apply_plan(opts, path, str(model))
    backend = open_backend(path, opts)
    drafter = make_drafter(opts.draft, backend, opts, str(model)) if opts.draft else None
    rt = Runtime(backend, model, drafter, opts.draft_width, opts.draft_depth)
    if budget is not None:
        rt.plan = budget
        rt.controller.memory = MemoryGuard(budget.budget, node_bytes(read_shape(path)))
    return rt


def apply_plan(opts: LoadOptions, path: Path, model: str):
    """Options rewritten by the memory planner for ``opts.memory_budget`` (raises ``BudgetError``)."""
    import dataclasses

    from edgespec.memory.planner import plan

    draft = resolve_draft(opts.draft, model)
    weights = redrafter_weights(model) if draft == "redrafter" else None
    p = plan(path, parse_size(opts.memory_budget), want_ctx=opts.n_ctx, draft=None if draft == "none" else draft,
             backend=pick_backend(opts.backend), draft_bytes=drafter_bytes(draft, weights) if draft else 0)
    opts = dataclasses.replace(opts, n_ctx=p.n_ctx, kv_type=p.kv_type, n_batch=p.n_batch, draft=p.draft)
    return opts, p
