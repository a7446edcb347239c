"""The structured-output bench set through ``edgespec serve`` and the ``openai`` client: each task's
``response_format`` (a JSON schema with ``strict``, JSON mode, edgespec's ``regex``), and for the tool-call tasks
the tool itself with ``"strict": true`` and ``tool_choice: "required"``; greedy and sampled (``--seeds``). Every
answer is validated against its task's schema or regex (a tool call as ``{"name", "arguments"}``).

    python -m edgespec.benches.structured_server --model qwen2.5-coder-0.5b --seeds 3 --max-tokens 384 \\
        --out bench_out/structured-server
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from edgespec.benches.server import Options, ServerProc
from edgespec.benches.structured import validator
from edgespec.benches.structured_tasks import TASKS, Task

KEY = "structured-bench"


def tool_of(task: Task) -> dict | None:
    """A tool-call task's tool: the name its schema pins and its arguments' schema, strict; None otherwise."""
    if not task.name.startswith("tool-"):
        return None
    props = task.schema["properties"]
    return {"type": "function", "function": {"name": props["name"]["const"], "parameters": props["arguments"],
                                             "strict": True}}


def ask(client, model: str, task: Task, seed: int | None, max_tokens: int) -> tuple[str, str, int]:
    """(the answer as its schema sees it, finish reason, completion tokens) for one request."""
    kw = dict(model=model, messages=[{"role": "user", "content": task.message}], max_tokens=max_tokens,
              temperature=0.0 if seed is None else 0.7)
    if seed is not None:
        kw["seed"] = seed
    tool = tool_of(task)
    if tool is not None:
        kw.update(tools=[tool], tool_choice="required")
    else:
        kw["response_format"] = task.response_format
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    text = choice.message.content or ""
    if tool is not None:
        calls = choice.message.tool_calls or []
        text = calls[0].function.arguments if calls else ""
        try:
            text = json.dumps({"name": calls[0].function.name, "arguments": json.loads(text)}) if calls else ""
        except ValueError:
            pass  # not JSON: left as it came, invalid
    return text, choice.finish_reason, r.usage.completion_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgespec.benches.structured_server",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", default="qwen2.5-coder-0.5b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--draft", default="auto")
    p.add_argument("--seeds", type=int, default=3, help="sampled runs per task besides the greedy one")
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--out", default="bench_out/structured-server")
    a = p.parse_args(argv)
    import openai

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    srv = ServerProc(Options(a.model, a.threads, a.n_ctx, a.draft, exact=False, adapt="auto"),
                     ["--api-key", KEY], out / "server.log")
    answers = []
    t0 = time.perf_counter()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        for task in TASKS:
            valid = validator(task)
            for seed in [None, *range(1, a.seeds + 1)]:
                text, finish, n = ask(client, a.model, task, seed, a.max_tokens)
                ok = valid(text)
                answers.append({"task": task.name, "seed": seed, "valid": ok, "finish": finish, "tokens": n,
                                "text": text})
                print(f"{task.name:18s} seed={seed!s:4s} {n:4d} tok {finish:10s}{'' if ok else '  INVALID'}",
                      flush=True)
    finally:
        srv.stop()
    n_valid = sum(x["valid"] for x in answers)
    summary = {"model": a.model, "draft": a.draft, "tasks": len(TASKS), "seeds": a.seeds, "max_tokens": a.max_tokens,
               "answers": len(answers), "valid": n_valid, "finish": dict(Counter(x["finish"] for x in answers)),
               "wall_s": round(time.perf_counter() - t0, 1), "command": "python -m edgespec.benches.structured_server "
               + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "structured_server.json").write_text(json.dumps({"summary": summary, "answers": answers}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if n_valid == len(answers) else 1


if __name__ == "__main__":
    sys.exit(main())
