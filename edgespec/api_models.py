"""The server's request bodies: the OpenAI chat and completions APIs as pydantic models (strict types, unknown
fields refused), which also give the OpenAPI schema. Fields that edgespec cannot honour are declared so that
they can be refused by name with a 400 (``unsupported``), never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class Prediction(_Strict):
    type: Literal["content"]
    content: str | list[ContentPart]


class ResponseFormat(_Open):
    """OpenAI's ``response_format`` (``json_schema``: {"name", "schema", "strict"}), plus edgespec's
    ``{"type": "regex", "pattern"}`` and ``{"type": "grammar", "grammar": <Lark or GBNF>}``; the content is
    checked by ``structured.grammar_of``."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]


Stop = str | Annotated[list[str], Field(max_length=16)] | None
Temperature = Field(default=None, ge=0, le=2)
TopP = Field(default=None, ge=0, le=1)


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Temperature
    top_p: float | None = TopP
    top_k: int | None = Field(default=None, ge=0, description="extension: sample from the k most likely tokens")
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = Field(default=None, ge=1, description="only 1 is supported")
    logit_bias: dict[str, float] | None = Field(default=None, description="unsupported (400 unless empty)")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="unsupported unless 0")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="unsupported unless 0")
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object, json_schema, and edgespec's regex and grammar (Lark or GBNF)")
    json_schema: dict[str, Any] | None = Field(default=None, description="llama-server's: a JSON schema for the answer")
    grammar: str | None = Field(default=None, description="llama-server's: a GBNF (or Lark) grammar for the answer")
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    prediction: Prediction | None = None
    logprobs: bool | None = Field(default=None, description="unsupported")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="unsupported")
    modalities: list[str] | None = Field(default=None, description="only ['text']")
    audio: dict[str, Any] | None = Field(default=None, description="unsupported")
    reasoning_effort: str | None = Field(default=None, description="unsupported")
    web_search_options: dict[str, Any] | None = Field(default=None, description="unsupported")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(description="a string, or token ids (one prompt only)")
    echo: bool | None = Field(default=None, description="unsupported")
    suffix: str | None = Field(default=None, description="text after the insertion: fill in the middle (a model "
                                                         "with FIM tokens)")
    best_of: int | None = Field(default=None, ge=1, description="only 1 is supported")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="unsupported")


class ExtraChunk(_Strict):
    filename: str = Field(default="tmp", max_length=1024)
    text: str = ""
    time: Any = Field(default=None, description="accepted (llama.vscode and llama.vim send when they picked it)")


class InfillRequest(_Sampling):
    """llama-server's ``POST /infill`` as editors send it (llama.vscode, llama.vim): the code before and after the
    cursor, other files as context, and its editor stops. ``samplers``, ``cache_prompt``, ``t_max_prompt_ms`` and
    ``id_slot`` are accepted for compatibility: the prompt is always cached, and sampling is temperature (greedy by
    default), top-k and top-p."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=256)
    prompt: str = Field(default="", description="the cursor line up to the cursor, appended to input_prefix")
    n_predict: int | None = Field(default=None, ge=-1, description="tokens at most (-1 or none: 256, at most the "
                                                                   "context's room; 0: only cache the prompt)")
    n_indent: int = Field(default=0, ge=0, description="after the first line, stop at a line indented less")
    t_max_predict_ms: float | None = Field(default=None, description="after this long, stop at the next newline")
    t_max_prompt_ms: float | None = Field(default=None, description="accepted, not enforced")
    samplers: list[str] | str | None = Field(default=None, description="accepted; temperature, top_k, top_p apply")
    cache_prompt: bool | None = Field(default=None, description="accepted; the prompt is always cached")
    id_slot: int | None = Field(default=None, description="accepted; one slot")
    response_fields: list[Annotated[str, Field(max_length=256)]] | None = Field(default=None, max_length=64)
    lora: list[dict[str, Any]] | None = Field(default=None, description="unsupported (400 unless empty)")
    filename: str | None = Field(default=None, max_length=1024, description="extension: the current file's path")


def unsupported(body: _Sampling) -> tuple[str, str] | None:
    """(param, why) for the first field set to something edgespec does not do, else None."""
    checks: list[tuple[str, bool, str]] = [
        ("n", body.n not in (None, 1), "only n=1 is supported"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        ("presence_penalty", body.presence_penalty not in (None, 0), "presence_penalty is not supported"),
        ("frequency_penalty", body.frequency_penalty not in (None, 0), "frequency_penalty is not supported"),
    ]
    if isinstance(body, ChatRequest):
        checks += [
            ("logprobs", bool(body.logprobs), "logprobs are not supported"),
            ("top_logprobs", bool(body.top_logprobs), "top_logprobs are not supported"),
            ("modalities", body.modalities not in (None, ["text"]), "only the text modality is supported"),
            ("audio", body.audio is not None, "audio output is not supported"),
            ("reasoning_effort", body.reasoning_effort is not None, "reasoning_effort is not supported"),
            ("web_search_options", body.web_search_options is not None, "web search is not supported"),
        ]
    elif isinstance(body, InfillRequest):
        checks += [("lora", bool(body.lora), "LoRA adapters are not supported")]
    else:
        checks += [
            ("echo", bool(body.echo), "echo is not supported"),
            ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
            ("logprobs", bool(body.logprobs), "logprobs are not supported"),
        ]
    given = [k for k in ("response_format", "json_schema", "grammar") if getattr(body, k) is not None]
    checks.append((given[-1] if given else "", len(given) > 1, f"give one of {' and '.join(given)}, not both"))
    for param, bad, why in checks:
        if bad:
            return param, why
    return None


def response_format(body: _Sampling) -> tuple[dict | None, str]:
    """The request's response format as ``Request.response_format`` takes it, and the field it came from
    (OpenAI's ``response_format``, or llama-server's ``json_schema`` or ``grammar``)."""
    if body.json_schema is not None:
        return {"type": "json_schema", "json_schema": {"schema": body.json_schema}}, "json_schema"
    if body.grammar is not None:
        return {"type": "grammar", "grammar": body.grammar}, "grammar"
    rf = body.response_format
    return (None if rf is None else rf.model_dump(exclude_none=True)), "response_format"
