"""Fill-in-the-middle prompts from the model's own metadata, for code completion at an editor's cursor.

The FIM token ids come from the GGUF (``tokenizer.ggml.fim_{pre,suf,mid,pad,rep,sep}_token_id``); where a key is
missing they are found by their text in the vocabulary, from the same list of texts llama.cpp's vocabulary loader
falls back to (Qwen2.5-Coder's GGUFs carry no FIM keys: ``<|fim_prefix|>``, ``<|fim_suffix|>``,
``<|fim_middle|>``, ``<|repo_name|>``, ``<|file_sep|>``). A model without prefix, suffix and middle tokens is
refused with a ``ValueError``: it was not trained to fill in, and a chat-shaped guess would only mislead.

The prompt is laid out as Qwen2.5-Coder was trained for repository context and as llama-server's ``/infill``
renders it, so that what changes least comes first and stays in the KV cache while the user types::

    <|repo_name|>myproject\\n<|file_sep|>a.py\\n<a.py> <|file_sep|>b.py\\n<b.py> ... <|file_sep|>current.py\\n
    <|fim_prefix|>{prefix}{prompt}<|fim_suffix|>{suffix}<|fim_middle|>

Each piece is tokenized on its own (a chunk's tokens do not depend on its neighbours), with control tokens in
the text kept literal. The suffix in the prompt is its first ``SUFFIX_TOKENS`` tokens, as in llama-server: it
comes after the cursor, so it is evaluated again at every keystroke (the drafter still gets all of it). When the
whole does not fit, whole extra chunks are dropped oldest first, then the prefix is cut from its start (in steps
of ``CUT_STEP`` tokens, so that the start stays put while the user types on) and the suffix from its end (3:1, as
llama-server does).

An editor sends the last few hundred lines before the cursor, a window that slides at every new line and would
change the prompt from its first line on; ``anchored`` keeps the window's start where an earlier request had it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgespec.backends.base import Backend
from edgespec.models.drafting.prediction import PredictionDrafter

KINDS = ("pre", "suf", "mid", "pad", "rep", "sep")

# the token texts llama.cpp's vocabulary loader looks for when the GGUF has no FIM key (llama-vocab.cpp)
FALLBACK_TEXTS: dict[str, tuple[str, ...]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}

DEFAULT_REPO = "myproject"  # llama-server's names when the client gives none
DEFAULT_FILENAME = "filename"
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"  # between extra chunks, for a model without a file separator
SUFFIX_TOKENS = 128  # llama-server's share of its default batch (512 / 4) for the suffix
CUT_STEP = 256  # a prefix too long for the context loses its start in steps of this many tokens (a stable start)


class NoFimError(ValueError):
    """The model has no fill-in-the-middle tokens."""


@dataclass(frozen=True)
class FimTokens:
    """A model's FIM token ids (None where it has none)."""

    pre: int | None = None
    suf: int | None = None
    mid: int | None = None
    pad: int | None = None
    rep: int | None = None
    sep: int | None = None

    @property
    def usable(self) -> bool:
        return None not in (self.pre, self.suf, self.mid)


@dataclass(frozen=True)
class Chunk:
    """Text of another file, given as context (llama-server's ``input_extra`` item)."""

    filename: str
    text: str


@dataclass
class FimPrompt:
    tokens: list[int]
    truncated: bool  # extra chunks, prefix or suffix were cut to fit
    n_extra: int  # extra chunks kept
    suffix_tokens: list[int]  # all of the suffix (a drafting source), in the prompt only its start


def _token_id(backend: Backend, kind: str) -> int | None:
    n_vocab = backend.info.n_vocab
    meta = getattr(backend, "meta", None)
    value = meta(f"tokenizer.ggml.fim_{kind}_token_id") if meta is not None else None
    if value is not None:
        try:
            tok = int(value)
        except ValueError:
            tok = -1
        return tok if 0 <= tok < n_vocab else None
    for text in FALLBACK_TEXTS[kind]:
        ids = backend.tokenize(text, add_special=False, parse_special=True)
        if len(ids) == 1 and 0 <= ids[0] < n_vocab:
            return ids[0]
    return None


def fim_tokens(backend: Backend) -> FimTokens:
    """The model's FIM token ids: from the GGUF's keys, else found by text as llama.cpp does."""
    return FimTokens(**{k: _token_id(backend, k) for k in KINDS})


def require_fim(backend: Backend) -> FimTokens:
    """The model's FIM tokens, or ``NoFimError`` (a ``ValueError``) naming what is missing."""
    fim = fim_tokens(backend)
    if not fim.usable:
        missing = ", ".join(k for k in ("pre", "suf", "mid") if getattr(fim, k) is None)
        raise NoFimError(f"the model {backend.info.name!r} has no fill-in-the-middle tokens (missing: {missing}); "
                         "infill needs a model trained for it, such as qwen2.5-coder")
    return fim


def as_chunks(extra) -> list[Chunk]:
    """``extra`` as chunks: ``Chunk``s or ``{"filename", "text"}`` dicts (filename optional)."""
    out = []
    for i, c in enumerate(extra or ()):
        if isinstance(c, Chunk):
            out.append(c)
            continue
        if not isinstance(c, dict) or not isinstance(c.get("text", ""), str) \
                or not isinstance(c.get("filename", ""), str):
            raise ValueError(f"extra[{i}] must be {{'filename': str, 'text': str}}")
        out.append(Chunk(c.get("filename") or "tmp", c.get("text", "")))
    return out


def fim_prompt(backend: Backend, prefix: str, suffix: str = "", extra=(), prompt: str = "",
               filename: str | None = None, repo: str | None = None, reserve: int = 0,
               max_suffix: int = SUFFIX_TOKENS, fim: FimTokens | None = None) -> FimPrompt:
    """The FIM prompt tokens for a cursor between ``prefix + prompt`` and ``suffix``, with ``extra`` files first.
    ``reserve``: tokens kept free for the completion; ``max_suffix``: tokens of the suffix in the prompt at most.
    ``NoFimError`` for a model without FIM tokens."""
    fim = fim or require_fim(backend)
    chunks = as_chunks(extra)

    def tok(text: str) -> list[int]:
        return backend.tokenize(text, add_special=False, parse_special=False) if text else []

    head: list[int] = []
    if fim.rep is not None:
        head = [fim.rep] + tok((repo or DEFAULT_REPO) + "\n")
    parts: list[list[int]] = []
    for c in chunks:
        text = c.text if not c.text or c.text.endswith("\n") else c.text + "\n"
        if fim.sep is not None:
            parts.append([fim.sep] + tok(c.filename + "\n") + tok(text))
        else:
            parts.append(tok(CHUNK_SEPARATOR) + tok(text))
    current = [fim.sep] + tok((filename or DEFAULT_FILENAME) + "\n") if fim.sep is not None else []
    bos = [backend.info.bos] if backend.info.add_bos and backend.info.bos is not None else []
    pre, whole_suffix = tok(prefix) + tok(prompt), tok(suffix)
    suf = whole_suffix[:max_suffix]

    room = backend.n_ctx - 1 - reserve - len(bos) - 3  # the three FIM tokens
    truncated = False
    if len(pre) + len(suf) > room:  # cut the cursor's own file to fit: prefix:suffix = 3:1
        truncated = True
        keep_suf = min(len(suf), max(room // 4, room - len(pre)))
        cut = len(pre) - max(0, min(len(pre), room - keep_suf))
        pre, suf = pre[min(len(pre), -(-cut // CUT_STEP) * CUT_STEP):], suf[:keep_suf]
    left = room - len(pre) - len(suf) - len(head) - len(current)
    while parts and sum(map(len, parts)) > left:  # whole chunks, oldest first
        parts.pop(0)
        truncated = True
    if left < 0:  # no room for the repository lines either
        head, current, parts = [], [], []
    tokens = head + [t for p in parts for t in p] + current + bos + [fim.pre] + pre + [fim.suf] + suf + [fim.mid]
    return FimPrompt(tokens, truncated, len(parts), whole_suffix)


def anchored(previous: str, prefix: str, min_overlap: int = 200) -> str:
    """``prefix`` with the lines an earlier prefix of the same file (``previous``) had before it, when ``prefix``
    goes on from one of ``previous``'s line starts with all the rest of it (at least ``min_overlap`` characters):
    the window of lines an editor sends slides down as the cursor does, and this keeps its start, and so the
    prompt's tokens, where they were. Else ``prefix`` as it is."""
    if not previous or not prefix or len(prefix) < min_overlap:
        return prefix
    first = prefix[:prefix.find("\n") + 1] or prefix
    j = previous.find(first)
    while 0 <= j <= len(previous) - min_overlap:
        if (j == 0 or previous[j - 1] == "\n") and prefix.startswith(previous[j:]):
            return previous[:j] + prefix
        j = previous.find(first, j + 1)
    return prefix


def suffix_drafter(fp: FimPrompt) -> PredictionDrafter | None:
    """A per-request drafter over the suffix: a completion that joins the code after the cursor is drafted from
    it in order (the context n-grams already cover the prefix and the extra chunks)."""
    return PredictionDrafter(fp.suffix_tokens) if fp.suffix_tokens else None
