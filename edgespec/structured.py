"""Structured outputs: a ``response_format`` (JSON mode, a JSON schema, a regex, a Lark or GBNF grammar) compiled
into an llguidance grammar, and a ``Constraint`` per request that masks the next token's logits, consumes the
tokens chosen, finds the tokens the grammar forces and validates drafts.

The grammar is checked when the request is made (``grammar_of``: a ValueError naming the problem, such as a
keyword the engine cannot enforce); the llguidance tokenizer is built once per backend from its vocabulary.
"""

from __future__ import annotations

import json
import time
import weakref

import llguidance as llg
import numpy as np

from edgespec.backends.base import Backend

FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")
# JSON as most models write it (``json.dumps``'s separators, no newlines): keys, quotes and separators become
# single allowed tokens, which decoding appends without sampling
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class ConstraintError(RuntimeError):
    """A token the grammar rejects was chosen (a bug: every choice is made under the grammar's mask)."""


def grammar_of(response_format: dict | None) -> str | None:
    """The llguidance grammar of a ``response_format``, checked; None for no constraint (None or
    ``{"type": "text"}``). A ValueError names what is wrong (an unknown type, an invalid schema, regex or
    grammar, a schema keyword llguidance cannot enforce)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, not {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in FORMATS:
        raise ValueError(f"response_format.type must be one of {', '.join(FORMATS)}, not {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        grammar = _from_schema(ANY_OBJECT)
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        schema = spec["schema"]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"response_format.json_schema.schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        grammar = _from_schema(schema)
    elif kind == "regex":
        pattern = response_format.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("response_format.pattern must be a non-empty regular expression")
        grammar = llg.LLMatcher.grammar_from_regex(pattern)
    else:
        text = response_format.get("grammar")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("response_format.grammar must be a non-empty Lark or GBNF grammar")
        try:
            grammar = llg.grammar_from("grammar", text)  # GBNF (llama.cpp) is converted to Lark; Lark as is
        except ValueError as e:
            raise ValueError(f"response_format.grammar: {e}") from None
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(f"response_format ({kind}) is not supported: {'; '.join(messages)}"[:1000])
    return grammar


def _from_schema(schema: dict | bool) -> str:
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else json.dumps(schema),
                                                      defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ValueError(f"response_format json schema: {e}") from None


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_for(backend: Backend) -> llg.LLTokenizer:
    """The llguidance tokenizer of ``backend``'s vocabulary (built once per backend: ~0.7 s for 49k tokens)."""
    tok = _TOKENIZERS.get(backend)
    if tok is None:
        tok = _TOKENIZERS[backend] = _build_tokenizer(backend)
    return tok


class _Vocab:
    """What ``llg.TokenizerWrapper`` reads: every token's bytes, the EOS token and a tokenize function."""

    def __init__(self, backend: Backend):
        info = backend.info
        self.eos_token_id = min(info.eog) if info.eog else -1
        self.bos_token_id = info.bos
        self.tokens = [backend.token_bytes(t) for t in range(info.n_vocab)]
        self.special_token_ids: list[int] = []
        self._backend = weakref.ref(backend)  # the tokenizer, cached per backend, must not keep it alive

    def __call__(self, text: bytes | str) -> list[int]:
        backend = self._backend()
        if backend is None:
            raise RuntimeError("the backend of this tokenizer has been freed")
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return backend.tokenize(text, add_special=False, parse_special=False)


def _build_tokenizer(backend: Backend) -> llg.LLTokenizer:
    info = backend.info
    return llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(backend)), n_vocab=info.n_vocab,
                           eos_token=sorted(info.eog) or None)


class Constraint:
    """One request's grammar state: the tokens allowed next, the tokens chosen so far, and the time spent in
    the grammar engine (``grammar_s``)."""

    def __init__(self, tokenizer: llg.LLTokenizer, grammar: str):
        self.matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"response_format is not supported: {self.matcher.get_error()}")
        self.n_vocab = tokenizer.vocab_size
        self.eos = frozenset(tokenizer.eos_tokens)
        self._allowed: np.ndarray | None = None  # the mask of the current state, until it changes
        self.grammar_s = 0.0
        self.masks = 0  # masks computed

    @classmethod
    def for_backend(cls, backend: Backend, grammar: str) -> Constraint:
        return cls(tokenizer_for(backend), grammar)

    def allowed(self) -> np.ndarray:
        """A bool per token: may it come next?"""
        if self._allowed is None:
            t0 = time.perf_counter()
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            self._allowed = np.unpackbits(bits, bitorder="little")[:self.n_vocab].view(bool)
            self.grammar_s += time.perf_counter() - t0
            self.masks += 1
        return self._allowed

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """A copy of one logits row with every token the grammar rejects at -inf."""
        allowed = self.allowed()
        out = np.full(logits.shape[-1], -np.inf, dtype=logits.dtype)
        n = min(len(allowed), logits.shape[-1])
        np.copyto(out[:n], logits[:n], where=allowed[:n])
        return out

    def forced(self) -> int | None:
        """The only token the grammar allows next, if there is exactly one (appending it is exact: the masked
        distribution puts all its mass there)."""
        allowed = self.allowed()
        t0 = time.perf_counter()
        n = int(np.count_nonzero(allowed))
        tok = int(np.argmax(allowed)) if n == 1 else None
        self.grammar_s += time.perf_counter() - t0
        return tok

    def consume(self, tokens: list[int]) -> None:
        """Advance past ``tokens`` (each one allowed in turn, or ``ConstraintError``). An end-of-generation
        token where the grammar accepts ends the output and changes nothing."""
        t0 = time.perf_counter()
        if tokens and tokens[-1] in self.eos and self.matcher.is_accepting():
            tokens = tokens[:-1]
        ok = self.matcher.consume_tokens(tokens) if tokens else True
        self._allowed = None
        self.grammar_s += time.perf_counter() - t0
        if not ok:
            raise ConstraintError(f"the grammar rejected tokens {tokens}: {self.matcher.get_error()}")

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` consumed tokens."""
        if n:
            self.matcher.rollback(n)
            self._allowed = None

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens``, in order, the grammar allows from here (the state is left unchanged)."""
        t0 = time.perf_counter()
        n = self.matcher.validate_tokens(tokens)
        self.grammar_s += time.perf_counter() - t0
        return n

    def accepting(self) -> bool:
        """May the output end here (the grammar is satisfied)?"""
        return self.matcher.is_accepting()


def tool_call_format(tools: list[dict], tool_choice, close: str) -> dict | None:
    """A ``{"type": "grammar"}`` response format that makes the answer one tool call, for a tool_choice that asks
    for one (``"required"`` or a named function) after ``tools.forced_prefix`` opened it: the call's JSON (a named
    function: only its arguments, the name being in the prefix) and ``close``. A tool with ``"strict": true``
    gets its parameters' schema; another one any JSON object. None for any other tool_choice."""
    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   "arguments": _parameters(t["function"])},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        body = calls[0] if len(calls) == 1 else {"anyOf": calls}
        lark = f"start: call {json.dumps(close)}\ncall: %json {json.dumps(_with_options(body))}"
    elif isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        lark = f'start: args "}}" {json.dumps(close)}\nargs: %json {json.dumps(_with_options(_parameters(fn)))}'
    else:
        return None
    return {"type": "grammar", "grammar": lark}


def _parameters(fn: dict) -> dict:
    return (fn.get("parameters") or {"type": "object"}) if fn.get("strict") else {"type": "object"}


def _with_options(schema: dict) -> dict:
    return {**schema, "x-guidance": JSON_OPTIONS}
