"""Drafter construction: a drafter spec (``auto``, ``suffix``, ``ngram``, ``redrafter[:<file>]``, ``model:<id>``,
``xvocab:<id>``, ``none``) checked before any model loads, its planned memory, and the drafter itself.

``auto`` is the combined default (``models/drafting/auto.py``): the suffix drafter (this request, a prediction and
earlier requests; ``models/drafting/suffix.py``), plus the ReDrafter head shipped or
trained for the model (on probation: asked only while it pays), plus a request's prediction when given.

This is the one place that turns a spec into a drafter, for the CLI, the API, the benches and the server.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgespec import paths, registry
from edgespec.backends.base import Backend
from edgespec.models.drafting.drafter import Drafter

SPEC_HELP = "auto, suffix, ngram, redrafter[:<weights.npz>], model:<id or path>, xvocab:<id or path> or none"
NGRAM_BYTES = 8 << 20  # the n-gram index of a 4k-token context, generously
HISTORY_DIR = "draft-history"  # under the cache folder: where `edgespec drafter reset` looks for history files


@dataclass(frozen=True)
class DraftSpec:
    kind: str  # none | auto | suffix | ngram | redrafter | model | xvocab
    arg: str = ""  # weights file (redrafter; auto: its head, if any) or model id/path (model, xvocab)

    def __str__(self) -> str:
        return self.kind + (f":{self.arg}" if self.arg and self.kind != "auto" else "")

    @property
    def head(self) -> Path | None:
        """The ReDrafter weights this drafter uses, if any."""
        return Path(self.arg) if self.kind in ("redrafter", "auto") and self.arg else None


def redrafter_weights(model: str) -> Path | None:
    """Weights for a ReDrafter head on ``model``: the user's own (``edgespec train-drafter``) first, then
    the ones shipped with edgespec."""
    from edgespec.models.drafting import redrafter

    name = redrafter.weights_path(registry.model_key(model)).name
    user = paths.cache_dir() / "drafters" / name
    return user if user.exists() else redrafter.shipped(registry.model_key(model))


def parse(spec: str | None, model: str) -> DraftSpec:
    """Read and check a drafter spec without loading anything: ``auto`` takes the ReDrafter head of ``model``
    when one exists; a missing weights file or model is a ``ModelError``."""
    if spec is None or spec in ("", "none"):
        return DraftSpec("none")
    if spec == "auto":
        head = redrafter_weights(model)
        return DraftSpec("auto", str(head) if head else "")
    if spec in ("ngram", "suffix"):
        return DraftSpec(spec)
    if spec == "redrafter" or spec.startswith("redrafter:"):
        if ":" in spec:
            path = Path(spec.split(":", 1)[1]).expanduser()
            check_redrafter_file(path)
        else:
            path = redrafter_weights(model)
            if path is None:
                raise registry.ModelError(f"no ReDrafter weights for {model!r}: train one with "
                                          f"`edgespec train-drafter --target {model}` or use --draft ngram")
        return DraftSpec("redrafter", str(path))
    for kind in ("model", "xvocab"):
        if spec.startswith(kind + ":"):
            ref = spec[len(kind) + 1:]
            if not ref:
                raise ValueError(f"--draft {kind}: needs a model id or .gguf path")
            registry.check_ref(ref)
            return DraftSpec(kind, ref)
    raise ValueError(f"unknown drafter {spec!r}: use {SPEC_HELP}")


def check_redrafter_file(path: Path) -> None:
    """A one-line ``ModelError`` for a drafter file that is missing, not a file, or not ReDrafter weights."""
    from edgespec.models.drafting import redrafter

    if not path.exists():
        raise registry.ModelError(f"no drafter weights file at {path}")
    if not path.is_file():
        raise registry.ModelError(f"{path} is a directory, not a drafter weights file")
    try:
        redrafter.read_meta(path)
    except ValueError as e:
        raise registry.ModelError(str(e)) from e


def trainer_available() -> bool:
    """Online adaptation trains with torch (the ``train`` extra). An import system that refuses torch (a
    finder raising ImportError, ``sys.modules["torch"] = None``: ValueError) counts as not installed."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def planned_footprint(spec: DraftSpec, adapt: bool = False,
                      target_vocab: int = 0) -> Callable[[int, str, int], dict[str, int]]:
    """The drafter's declared memory, part by part, as a function of the target's planned context, KV type
    and prefill batch: a draft model is opened with the same three (``make``), so it holds its own KV cache of
    that length and type. The planner calls it for every candidate configuration and itemizes the parts.
    ``target_vocab``: the target's vocabulary size (a cross-vocabulary drafter maps both vocabularies)."""
    if spec.kind == "none":
        return lambda n_ctx, kv_type, n_batch: {}
    if spec.kind in ("ngram", "suffix", "redrafter", "auto"):
        from edgespec.models.drafting.suffix import SuffixConfig, declared_bytes

        parts = {"ngram_index": NGRAM_BYTES} if spec.kind == "ngram" else {}
        if spec.head is not None:
            from edgespec.models.drafting import online, redrafter

            parts["head"] = redrafter.declared_bytes(spec.head)
            if adapt:
                parts.update(online.declared_parts(spec.head))
        if spec.kind in ("suffix", "auto"):  # the request's index grows with the context
            return lambda n_ctx, kv_type, n_batch: {**parts,
                                                    "suffix_index": declared_bytes(SuffixConfig(), n_ctx)}
        return lambda n_ctx, kv_type, n_batch: dict(parts)
    from edgespec.memory.footprint import DRAFT, llama_footprint, read_shape

    shape = read_shape(registry.resolve(spec.arg))
    extra = {}
    if spec.kind == "xvocab":
        from edgespec.models.drafting.cross_vocab import declared_cache_bytes, declared_vocab_bytes

        extra = {f"{DRAFT}vocab_maps": declared_vocab_bytes(target_vocab, shape.n_vocab),
                 f"{DRAFT}span_cache": declared_cache_bytes(shape.n_vocab)}
    return lambda n_ctx, kv_type, n_batch: {**llama_footprint(shape, n_ctx, kv_type, n_batch, 1, prefix=DRAFT).parts,
                                            **extra}


def make(spec: DraftSpec, target: Backend, model: str, open_backend: Callable[[Path], Backend],
         history: str | None = None, weights: Path | None = None, n_ctx: int = 4096) -> Drafter | None:
    """Build the drafter of a parsed spec. ``open_backend(path)`` opens a draft model's backend with the
    target's planned context, KV type and batch (what ``planned_footprint`` declared). A ReDrafter head starts
    from this user's adapted state when that state was adapted from these very weights (``head_start``).
    ``history``: the file of the suffix drafter's cross-request index, for the model file ``weights``."""
    if spec.kind == "none":
        return None
    if spec.kind == "ngram":
        from edgespec.models.drafting.ngram import NgramDrafter

        return NgramDrafter()
    if spec.kind in ("suffix", "auto"):
        from edgespec.models.drafting.auto import AutoDrafter

        suffix = suffix_drafter(model, history, weights, n_ctx, target)
        if spec.kind == "suffix":
            return suffix
        head = None
        if spec.head is not None:
            from edgespec.models.drafting.redrafter import ReDrafter

            head = ReDrafter(head_start(spec.head, model), target, self_gating=True)
        return AutoDrafter([suffix], head)
    if spec.kind == "redrafter":
        from edgespec.models.drafting.redrafter import ReDrafter

        return ReDrafter(head_start(spec.head, model), target)
    backend = open_backend(registry.resolve(spec.arg))
    try:
        if spec.kind == "xvocab":
            from edgespec.models.drafting.cross_vocab import CrossVocabDrafter

            return CrossVocabDrafter(backend, target)
        from edgespec.models.drafting.draft_model import DraftModelDrafter

        return DraftModelDrafter(backend, target_vocab=target.info.n_vocab)
    except BaseException:
        backend.close()
        raise


def weights_key(path: Path) -> str:
    """What a draft history is keyed to: the model file's size and a SHA-256 of its first and last MiB (its
    header and metadata, and the tail of its tensors), cheap on a file of gigabytes."""
    import hashlib

    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()}"


def suffix_drafter(model: str, history: str | None, weights: Path | None, n_ctx: int = 4096,
                   target: Backend | None = None):
    """The suffix drafter, with its history file (a corrupt one or one for other weights is set aside with a
    notice on stderr) and, given the ``target``, the JSON-escaped views of each prompt."""
    from edgespec.models.drafting.suffix import SuffixDrafter
    from edgespec.models.drafting.views import json_views

    key = weights_key(weights) if history and weights is not None else registry.model_key(model)
    d = SuffixDrafter(history=history, key=key, context_tokens=n_ctx,
                      views=json_views(target) if target is not None else None)
    for line in d.notices:
        print(f"edgespec: {line}", file=sys.stderr)
    return d


def head_of(drafter: Drafter | None):
    """The ReDrafter head in ``drafter`` (itself, or the combined default's head), else None."""
    from edgespec.models.drafting.auto import AutoDrafter

    if isinstance(drafter, AutoDrafter):
        return drafter.head
    return drafter if drafter is not None and drafter.name == "redrafter" else None


def _state(model: str) -> Path:
    from edgespec.models.drafting.online import state_path

    return state_path(paths.cache_dir(), registry.model_key(model))


def head_start(weights: Path, model: str) -> Path:
    """The weights a head loads: this user's adapted state when it was adapted from ``weights`` (an explicit or
    newly trained head wins over an older state), else ``weights``. A corrupt state is ignored with a notice."""
    from edgespec.models.drafting import redrafter

    state = _state(model)
    if state.exists():
        try:
            if redrafter.read_meta(state).get("base") == redrafter.file_digest(weights):
                return state
        except ValueError as e:  # corrupt or from another version: start again from the base weights
            print(f"edgespec: ignoring adapted drafter state ({e})", file=sys.stderr)
    return weights


@dataclass
class LazyAdapter:
    """Online adaptation of ``head``, made only when called (the runtime calls it once the head has shown that
    it pays): until then neither torch nor the example buffer is in memory."""

    head: Drafter
    weights: Path
    model: str

    @property
    def bytes(self) -> int:
        from edgespec.models.drafting.online import declared_bytes

        return declared_bytes(self.weights)

    def __call__(self):
        from edgespec.models.drafting import redrafter
        from edgespec.models.drafting.online import OnlineAdapter

        self.head.adapter = OnlineAdapter(self.head, path=_state(self.model), base=redrafter.file_digest(self.weights))
        return self.head.adapter
