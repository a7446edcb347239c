"""The server's request preparation: an OpenAI request body turned into what the runtime runs (prompt tokens
through the chat template, a ``Request``, a prediction drafter, the tools to parse), checked against the context
and refused with an ``APIError`` naming the parameter."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from edgespec import structured
from edgespec import tools as toolcalls
from edgespec.api_models import ChatRequest, CompletionRequest, response_format
from edgespec.generate import PromptTooLongError, check_stop
from edgespec.infill import NoFimError, fim_prompt, suffix_drafter
from edgespec.models.drafting.prediction import PredictionDrafter
from edgespec.options import Request
from edgespec.runtime import Runtime, TemplateError
from edgespec.server_openai import APIError, value_error

DEFAULT_CHAT_MAX_TOKENS = 2048  # a chat answer's length when the request sets none (--max-tokens)
CHARS_PER_TOKEN = 64  # no real text averages more characters per token: longer texts are refused untokenized
MAX_JSON_DEPTH = 64  # nesting of tool-call arguments and tool parameters


@dataclass
class Prepared:
    tokens: list[int]
    req: Request
    drafter: PredictionDrafter | None
    tools: frozenset[str] | None  # the request's tool names: parse tool calls out of the answer
    prefix: str  # text forced at the start of the answer (tool_choice), part of the prompt
    truncated: bool = False  # a fill-in-the-middle prompt was cut to fit the context


def check_options(body) -> None:
    """Checks that cost nothing, made before any text is tokenized: the stop strings."""
    try:
        check_stop(() if body.stop is None else body.stop)
    except ValueError as e:
        raise value_error(e) from e


def too_long(n_ctx: int, what: str, param: str) -> APIError:
    return APIError(400, f"this model's context holds {n_ctx} tokens, but the {what}; shorten it", param=param,
                    code="context_length_exceeded")


def check_chars(rt: Runtime, chars: int, what: str, param: str) -> None:
    """Refuse a text too long for the context by its characters alone (before tokenizing it)."""
    n_ctx = rt.backend.n_ctx
    if chars > n_ctx * CHARS_PER_TOKEN:
        raise too_long(n_ctx, f"{what} has {chars} characters", param)


def depth(obj, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON value, counted up to ``limit + 1`` (without recursion)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            deepest = max(deepest, d)
            if deepest > limit:
                break
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def check_depth(obj, param: str) -> None:
    if depth(obj) > MAX_JSON_DEPTH:
        raise APIError(400, f"{param} is nested deeper than {MAX_JSON_DEPTH} levels", param=param,
                       code="invalid_value")


def prepare_chat(rt: Runtime, body: ChatRequest, default_max_tokens: int | None = DEFAULT_CHAT_MAX_TOKENS) -> Prepared:
    """A chat request as prompt tokens, generation options and its tools, or an ``APIError``. Cheap checks
    come first; the prompt is refused by its characters, then while its pieces are tokenized, as soon as it is
    known not to fit."""
    check_options(body)
    n_ctx = rt.backend.n_ctx
    msgs = []
    chars = 0
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                                   param=f"messages[{i}].content[{j}]", code="unsupported_content")
            content = "".join(p.text for p in content)
        chars += len(content or "")
        d = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            for j, c in enumerate(m.tool_calls):
                args = c.function.arguments
                chars += len(args) if isinstance(args, str) else 0
                check_depth(args, f"messages[{i}].tool_calls[{j}].function.arguments")
        for k in ("name", "tool_call_id"):
            if getattr(m, k) is not None:
                d[k] = getattr(m, k)
        msgs.append(d)
    tools, prefix = None, ""
    choice = body.tool_choice
    if body.tools:
        for k, t in enumerate(body.tools):
            check_depth(t.function.parameters, f"tools[{k}].function.parameters")
        names = {t.function.name for t in body.tools}
        if not isinstance(choice, str | None) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        if choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in body.tools]
            choice = choice.model_dump() if not isinstance(choice, str | None) else choice
            prefix = toolcalls.forced_prefix(choice, rt.backend.info.chat_template)
    elif choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice requires tools", param="tool_choice")
    check_chars(rt, chars, "prompt", "messages")
    pred_text = None
    if body.prediction is not None:
        p = body.prediction.content
        pred_text = p if isinstance(p, str) else "".join(part.text or "" for part in p)
        check_chars(rt, len(pred_text), "prediction", "prediction")
    try:
        tokens = rt.encode_chat(toolcalls.template_messages(msgs), tools, limit=n_ctx - 1)
    except PromptTooLongError as e:
        raise too_long(n_ctx, f"prompt has more than {n_ctx - 1} tokens", "messages") from e
    except TemplateError as e:
        raise APIError(400, f"the chat template could not render the messages: {e}", param="messages") from e
    if prefix:
        tokens = tokens + rt.backend.tokenize(prefix, add_special=False, parse_special=True)
    drafter = None
    if pred_text:
        pred = rt.backend.tokenize(pred_text, add_special=False, parse_special=False)
        if len(pred) > n_ctx:  # checked before the drafter indexes it
            raise too_long(n_ctx, f"prediction has {len(pred)} tokens", "prediction")
        drafter = PredictionDrafter(pred) if pred else None
    limit = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    tool_format = None
    if prefix and body.tools:  # the answer is a call: its JSON follows the tools' schemas (strict ones exactly)
        tool_format = structured.tool_call_format(tools, choice, "\n" + toolcalls.CLOSE)
    req = make_request(rt, body, tokens, limit, param, default_max_tokens, tool_format)
    names = frozenset(t.function.name for t in body.tools) if tools else None
    return Prepared(tokens, req, drafter, names, prefix)


def prepare_completion(rt: Runtime, body: CompletionRequest) -> Prepared:
    """A text completion request as prompt tokens and generation options, or an ``APIError``."""
    check_options(body)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], str):
        if len(p) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        p = p[0]
    if body.suffix:
        if not isinstance(p, str):
            raise APIError(400, "suffix needs the prompt as text", param="prompt")
        return prepare_fim(rt, body, p)
    if isinstance(p, str):
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        check_chars(rt, len(p), "prompt", "prompt")
        tokens = rt.tokens_of(p)
    else:
        n_vocab = rt.backend.info.n_vocab
        if len(p) >= rt.backend.n_ctx:
            raise too_long(rt.backend.n_ctx, f"prompt has {len(p)} tokens", "prompt")
        if not p or any(not 0 <= t < n_vocab for t in p):
            raise APIError(400, f"token ids must be a non-empty list of integers in [0, {n_vocab})",
                           param="prompt")
        tokens = list(p)
    req = make_request(rt, body, tokens, body.max_tokens, "max_tokens", 16)  # 16: OpenAI's default here
    return Prepared(tokens, req, None, None, "")


def prepare_fim(rt: Runtime, body: CompletionRequest, prompt: str) -> Prepared:
    """A completion with ``suffix``: fill in the middle between the prompt and the suffix, in the model's own FIM
    format (``infill``); a 400 naming ``suffix`` for a model without FIM tokens."""
    check_chars(rt, len(prompt) + len(body.suffix), "prompt with its suffix", "prompt")
    max_tokens = body.max_tokens or 16  # OpenAI's default here
    try:
        fp = fim_prompt(rt.backend, prompt, body.suffix, reserve=min(max_tokens, rt.backend.n_ctx // 2))
    except NoFimError as e:
        raise APIError(400, str(e), param="suffix", code="unsupported_parameter") from e
    req = make_request(rt, body, fp.tokens, body.max_tokens, "max_tokens", 16)
    return Prepared(fp.tokens, req, suffix_drafter(fp) if rt.drafter is not None else None, None, "", fp.truncated)


def make_request(rt: Runtime, body, tokens: list[int], max_tokens: int | None, param: str,
                 default: int | None, tool_format: dict | None = None) -> Request:
    """The generation request, or a 400: a prompt that does not fit with the asked completion length is
    refused with the token counts (a default length is cut to the room left instead). ``tool_format``: the
    grammar of a tool call that tool_choice asks for."""
    n_ctx = rt.backend.n_ctx
    n = len(tokens)
    if max_tokens is None and n < n_ctx:
        max_tokens = min(default or n_ctx, n_ctx - n)
    if n >= n_ctx or n + max_tokens > n_ctx:
        want = f" plus {max_tokens} for the completion" if max_tokens is not None else ""
        raise APIError(400, f"this model's context holds {n_ctx} tokens, but the prompt has {n}{want}; shorten "
                            f"the prompt{' or lower ' + param if max_tokens else ''}",
                       param="messages" if isinstance(body, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    fmt, field = response_format(body)
    if tool_format is not None:
        if fmt is not None:
            raise APIError(400, f"{field} cannot be combined with a tool_choice that asks for a tool call",
                           param=field)
        fmt, field = tool_format, "tools"
    try:
        return Request(max_tokens=max_tokens,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                       stop=() if body.stop is None else body.stop, cancel=threading.Event(), response_format=fmt)
    except ValueError as e:
        err = value_error(e)
        if str(e).startswith("response_format"):  # an invalid or unsupported schema, regex or grammar
            err.param = field
            if field == "tools":
                err.message = "a strict tool's parameters cannot be enforced: " + err.message.split(": ", 1)[-1]
        raise err from e


async def prepare(fn, *args) -> Prepared:
    """Tokenize and check a request in a worker thread (long prompts take a while)."""
    try:
        return await run_in_threadpool(fn, *args)
    except UnicodeError as e:  # a lone surrogate ("\\ud800") is valid JSON but not text
        raise APIError(400, "the request holds text that is not valid Unicode (a lone surrogate)",
                       code="invalid_unicode") from e
