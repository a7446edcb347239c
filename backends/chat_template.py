"""Chat templates: the Jinja template stored in a GGUF's ``tokenizer.chat_template``, rendered with jinja2."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used only when a GGUF carries no template: plain ChatML.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(msg: str):
    raise TemplateError(msg)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str | None, messages: list[dict], bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}]) to the prompt text the model was trained on.
    ``tools``: OpenAI-style tool definitions, passed to templates that support them (Qwen2.5's does)."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
    return _compile(template or CHATML).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt,
        tools=tools or None,
    )
