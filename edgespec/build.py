"""Building a runtime: options checked before anything loads, the backend picked for the platform, the memory
plan applied, the drafter made. ``load`` is the one path used by the CLI, the Python API, the benches and
the server.

Defaults (the same in ``edgespec.load`` and on the command line): ``draft="auto"`` (suffix drafting, the
ReDrafter head shipped for the model on probation, a request's prediction; each step the tree that pays most
at the measured verify costs, plain decoding where none pays) and ``adapt="auto"`` (online adaptation of the
head starts only once the head has shown that it pays on this machine, and only where its trainer, torch, is
installed).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from edgespec import drafters, registry
from edgespec.backends.base import Backend
from edgespec.memory.footprint import RUNTIME_OVERHEAD, node_bytes, read_shape
from edgespec.memory.live import MemoryGuard
from edgespec.memory.planner import SAFETY, parse_size, plan
from edgespec.options import LoadOptions
from edgespec.runtime import Runtime


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
            raise registry.ModelError(f"the MLX backend needs `pip install 'edgespec[mlx]'` ({e})") from e
        limit = int(parse_size(opts.memory_budget) * (1 - SAFETY)) if opts.memory_budget else None
        return MlxBackend(path, n_ctx=opts.n_ctx, n_batch=opts.n_batch, memory_limit=limit, kv_type=opts.kv_type)
    from edgespec.backends.llama_cpp import LlamaCppBackend

    # llama.cpp clamps its batch to the requested context (and may round the context up): a larger batch
    # on the Python side would hand it more tokens than it accepts, an assertion that aborts the process
    return LlamaCppBackend(path, n_ctx=opts.n_ctx, n_threads=opts.n_threads, kv_type=opts.kv_type,
                           n_batch=min(opts.n_batch, opts.n_ctx), huge_pages=opts.huge_pages)


@dataclass(frozen=True)
class Checked:
    """A load that has passed every check possible before a model loads."""

    model: str
    options: LoadOptions
    spec: drafters.DraftSpec  # the drafter, parsed
    overhead: int = RUNTIME_OVERHEAD  # what the process holds besides the model (a server adds its libraries)


def check(model: str, options: LoadOptions) -> Checked:
    """Everything that can be checked before a model loads: the model reference and the drafter spec."""
    registry.check_ref(model)
    return Checked(str(model), options, drafters.parse(options.draft, str(model)))


def adapting(opts: LoadOptions, spec: drafters.DraftSpec) -> bool:
    """Online adaptation of a ReDrafter head: the drafter has a head, adaptation is asked for (True, or "auto":
    once the head pays) and its trainer is installed."""
    return spec.head is not None and opts.adapt in (True, "auto") and drafters.trainer_available()


def load(model: str = registry.DEFAULT_MODEL, options: LoadOptions | None = None, **kwargs) -> Runtime:
    """Load a model by registry id or ``.gguf`` path (downloading a registry model on first use).

    Options: a ``LoadOptions`` or its keywords (not both): n_ctx, n_threads, kv_type (f16|q8_0|q4_0), backend
    (auto|llama.cpp|mlx), draft (auto, suffix, ngram, redrafter[:<file>], model:<id>, xvocab:<id>, none),
    draft_depth (fix the depth instead of the cost-aware controller), draft_width, adapt (True, False, auto),
    memory_budget, exact, huge_pages, draft_history (a file for the suffix drafter's cross-request index).
    """
    if options is not None and kwargs:
        raise TypeError(f"give LoadOptions or its keywords, not both ({', '.join(kwargs)})")
    return open_runtime(check(str(model), options or LoadOptions(**kwargs)))


def open_runtime(checked: Checked) -> Runtime:
    """The runtime of a checked load: the memory plan applied, the backend and the drafter opened."""
    model, opts, spec = checked.model, checked.options, checked.spec
    notices: list[str] = []
    adapt = adapting(opts, spec)
    if spec.head is not None and opts.adapt in (True, "auto") and not adapt:  # wanted, but no trainer
        notices.append("online adaptation is off: it needs torch (pip install 'edgespec[train]')")
    path = registry.resolve(model)
    budget = None
    if opts.memory_budget is not None:  # adaptation is counted when it is on from the start (adapt=True)
        opts, spec, budget = apply_plan(opts, path, spec, adapt and opts.adapt is True, checked.overhead)
    backend = open_backend(path, opts)
    try:
        # the draft model gets the planned context, KV type and batch: what its declared footprint assumed
        draft_open = lambda p: open_backend(p, dataclasses.replace(opts, backend="llama.cpp", memory_budget=None))
        drafter = drafters.make(spec, backend, model, draft_open, history=opts.draft_history, weights=path,
                                n_ctx=opts.n_ctx)
    except BaseException:
        backend.close()
        raise
    head = drafters.head_of(drafter)
    lazy = drafters.LazyAdapter(head, spec.head, model) if adapt and head is not None else None
    # adapt=True: adapt from the first request; "auto": once the head has shown that it pays on this machine
    adapter = lazy() if lazy is not None and opts.adapt is True else None
    rt = Runtime(backend, model, drafter, opts.draft_width, opts.draft_depth, exact=opts.exact,
                 adapter=adapter, make_adapter=lazy if adapter is None else None)
    rt.notices = notices
    if budget is not None:
        rt.plan = budget
        rt.controller.memory = MemoryGuard(budget.budget, node_bytes(read_shape(path)))
    return rt


def plan_for(path: Path, budget: int, n_ctx: int, min_ctx: int, spec: drafters.DraftSpec, adapt: bool,
             backend: str = "auto", overhead: int = RUNTIME_OVERHEAD):
    """The memory plan for the model at ``path`` with drafter ``spec`` (its declared parts counted) under
    ``budget`` bytes: what ``apply_plan`` applies and ``edgespec plan`` prints. ``overhead``: what the
    process holds before the model loads."""
    shape = read_shape(path)
    return plan(shape, budget, want_ctx=n_ctx, min_ctx=min_ctx, draft=None if spec.kind == "none" else str(spec),
                backend=pick_backend(backend), draft_bytes=drafters.planned_footprint(spec, adapt, shape.n_vocab),
                overhead=overhead)


def apply_plan(opts: LoadOptions, path: Path, spec: drafters.DraftSpec, adapt: bool,
               overhead: int = RUNTIME_OVERHEAD):
    """Options rewritten by the memory planner for ``opts.memory_budget`` (raises ``BudgetError``): the
    drafter's declared parts (a draft model's weights, KV cache and buffers, a head and its adaptation) are
    counted, and ``overhead`` (the runtime's libraries; a server's too). The context is halved down to 512
    tokens at most (or the asked-for context, when smaller)."""
    p = plan_for(path, parse_size(opts.memory_budget), opts.n_ctx, min(512, opts.n_ctx), spec, adapt, opts.backend,
                 overhead=overhead)
    if p.draft is None:
        spec = drafters.DraftSpec("none")
    opts = dataclasses.replace(opts, n_ctx=p.n_ctx, kv_type=p.kv_type, n_batch=p.n_batch)
    return opts, spec, p
