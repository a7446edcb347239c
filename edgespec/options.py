"""The options of a load and of a request, each built once from the CLI's or the server's arguments (or the
API's keywords), checked once, and passed down unchanged: ``LoadOptions`` to ``build.load`` and the
``Runtime``, ``Request`` to ``Runtime.start`` and the decoding loop. One name and one default per knob.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgespec.generate import Cancel, GenerationConfig
from edgespec.memory.planner import parse_size
from edgespec.sampling import SamplingParams
from edgespec.structured import grammar_of

MAX_WIDTH = 8  # the llama.cpp backend verifies trees of at most 8 leaves (n_seq_max)

BACKENDS = ("auto", "llama.cpp", "mlx")
KV_TYPES = ("f16", "q8_0", "q4_0")


@dataclass
class LoadOptions:
    n_ctx: int = 4096
    n_threads: int | None = None
    kv_type: str = "f16"  # f16 | q8_0 | q4_0
    backend: str = "auto"
    # None/"none" | "auto" | "suffix" | "ngram" | "redrafter[:<path>]" | "model:<id>" | "xvocab:<id>"
    draft: str | None = "auto"
    draft_depth: int | None = None  # fixed draft depth instead of the cost-aware controller
    draft_width: int | None = None  # candidates per node / beams (default: the drafter's own)
    n_batch: int = 512
    adapt: bool | str = "auto"  # online adaptation of a ReDrafter head (auto: where torch is installed)
    memory_budget: int | str | None = None  # bytes or "1.5GB": plan context/KV/batch/drafter to fit it
    exact: bool = False  # verify batches only as large as stay bit-identical to plain decoding
    huge_pages: bool | None = None  # llama.cpp buffers in huge pages (None: on unless EDGESPEC_HUGE_PAGES=0)
    draft_history: str | None = None  # a file that keeps the suffix drafter's cross-request index (None: memory)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {KV_TYPES}, not {self.kv_type!r}")
        _positive("n_ctx", self.n_ctx, 16)
        _positive("n_batch", self.n_batch, 1)
        if self.n_threads is not None:
            _positive("n_threads", self.n_threads, 1)
        if self.draft_depth is not None:
            _positive("draft_depth", self.draft_depth, 0)
        if self.draft_width is not None:
            _positive("draft_width", self.draft_width, 1)
            if self.draft_width > MAX_WIDTH:
                raise ValueError(f"draft_width must be at most {MAX_WIDTH} (the most tree leaves a "
                                 f"verify takes), not {self.draft_width}")
        if self.adapt not in (True, False, "auto"):
            raise ValueError(f"adapt must be True, False or 'auto', not {self.adapt!r}")
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        if self.huge_pages is not None and not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages must be True, False or None, not {self.huge_pages!r}")


def _positive(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, not {value!r}")


@dataclass
class Request:
    """Per-request generation options, as accepted by ``generate``/``stream``/``chat``; checked when made."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str = ()
    ignore_eos: bool = False
    cancel: Cancel = None
    timeout: float | None = None  # seconds to wait for the model before BusyError (None: wait)
    n_indent: int = 0  # editors: after the first line, stop at a line indented less than this (0: off)
    t_max_predict_ms: float = 0.0  # editors: after this long generating, stop at the next newline (0: off)
    # structured output: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}},
    # {"type": "regex", "pattern": ...} or {"type": "grammar", "grammar": <Lark or GBNF>} (edgespec.structured)
    response_format: dict | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{name} must be a number, not {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, not {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if self.timeout is not None and not self.timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, not {self.timeout!r}")
        self._config = self.config()  # raises ValueError naming a bad max_tokens/temperature/top_p/top_k/stop
        self._grammar = grammar_of(self.response_format)  # raises ValueError naming an invalid/unsupported one
        if self._grammar is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a response_format (the grammar decides the end)")

    def config(self) -> GenerationConfig:
        sp = SamplingParams(float(self.temperature), self.top_k, float(self.top_p), self.seed)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return GenerationConfig(self.max_tokens, sp, stop, self.ignore_eos, self.n_indent, self.t_max_predict_ms)


def as_request(request: Request | None, options: dict) -> Request:
    """The request's options: a ``Request`` made by the caller, or one made here from keywords."""
    if request is None:
        return Request(**options)
    if options:
        raise TypeError(f"give a Request or its keywords, not both ({', '.join(options)})")
    if not isinstance(request, Request):
        raise TypeError(f"request must be an edgespec.Request, not {type(request).__name__}")
    return request
