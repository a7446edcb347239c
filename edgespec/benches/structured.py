"""``edgespec bench --constrained``: structured outputs, interleaved on the bench set (``structured_tasks``).

Methods, each task run by all of them in a rotated order so that machine noise hits all alike:
* ``plain``: edgespec's constrained plain decoding (the mask on every token, no forced batching, no drafts);
* ``default``: edgespec's default constrained path (``Runtime.chat(..., response_format=...)``: forced tokens in
  one batch, drafts cut by the grammar, under the runtime's drafter);
* ``llama-python``: llama-cpp-python's own grammar-constrained generation (``LlamaGrammar``; JSON schemas through
  its ``from_json_schema``, JSON mode through its ``JSON_GBNF``; regexes have no GBNF there and are skipped).

Every answer is checked against its schema (``jsonschema_rs``, else ``jsonschema``) or regex; greedy ``default``
answers are compared with ``plain`` token by token, and a difference is certified as a near-tie only where plain
decoding's top-two gap among the tokens the grammar allows, at the first token that differs, is below the speed
bench's ``NEAR_TIE`` (``--exact`` loads the runtime in exact mode, where no difference may remain). Reported:
validity, tok/s (decode, after the first token), tokens forced per answer and the grammar engine's time per token
(mask overhead).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgespec import machine
from edgespec.backends.base import common_prefix
from edgespec.benches.speed import NEAR_TIE, llama_generate, top2_margin
from edgespec.benches.structured_tasks import TASKS, Task
from edgespec.generate import Stats, plain_steps, stream
from edgespec.options import Request
from edgespec.structured import Constraint

METHODS = ("plain", "default", "llama-python")


@dataclass
class Answer:
    method: str
    task: str
    seed: int | None
    text: str
    tokens: int
    tok_s: float
    valid: bool
    forced: int = 0
    grammar_ms_per_token: float = 0.0
    extra: dict = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # the tokens, for the greedy comparison


def validator(task: Task):
    """A function text -> valid? for the task's schema or regex."""
    if task.response_format["type"] == "regex":
        pattern = re.compile(task.response_format["pattern"])
        return lambda text: pattern.fullmatch(text) is not None
    schema = task.schema
    try:
        import jsonschema_rs

        check = jsonschema_rs.validator_for(schema).is_valid
    except ImportError:
        import jsonschema

        check = jsonschema.Draft202012Validator(schema).is_valid

    def valid(text: str) -> bool:
        try:
            return check(json.loads(text))
        except ValueError:
            return False

    return valid


class Runner:
    def __init__(self, model: str, n_ctx: int, n_threads: int, draft: str, max_tokens: int, methods: list[str],
                 exact: bool = False):
        import edgespec

        self.rt = edgespec.load(model, n_ctx=n_ctx, n_threads=n_threads, draft=draft, backend="llama.cpp",
                                exact=exact)
        self.max_tokens = max_tokens
        self.llm = None
        if "llama-python" in methods:
            from llama_cpp import Llama

            self.llm = Llama(model_path=self.rt.backend.path, n_ctx=n_ctx, n_threads=n_threads,
                             n_threads_batch=n_threads, flash_attn=True, verbose=False)
        self._grammars: dict[str, object] = {}

    def prompt(self, task: Task) -> list[int]:
        return self.rt.encode_chat([{"role": "user", "content": task.message}])

    def run(self, method: str, task: Task, seed: int | None) -> Answer | None:
        temp = 0.0 if seed is None else 0.7
        prompt = self.prompt(task)
        if method == "llama-python":
            return self._run_llama(task, prompt, temp, seed)
        backend = self.rt.backend
        backend.truncate(0)
        req = Request(max_tokens=self.max_tokens, temperature=temp, seed=seed, response_format=task.response_format)
        if method == "default":
            gen = self.rt.start(prompt, req)
            text, stats, out = gen.text(), gen.stats, gen.tokens
        else:
            stats, out = Stats(), []
            constraint = Constraint.for_backend(backend, req._grammar)
            steps = functools.partial(plain_steps, constraint=constraint)
            text = "".join(stream(backend, prompt, req._config, stats, steps=steps, out_tokens=out))
        n = max(stats.generated_tokens, 1)
        return Answer(method, task.name, seed, text, stats.generated_tokens, stats.tok_s, validator(task)(text),
                      stats.forced, 1000 * stats.grammar_s / n, {"finish": stats.finish_reason}, list(out))

    def margin_at(self, task: Task, plain: list[int], i: int) -> float:
        """Constrained plain decoding's top-two logit gap after ``plain[:i]``, among the tokens the grammar allows
        there (a prefill from an empty cache; inf where the grammar allows one token only)."""
        constraint = Constraint.for_backend(self.rt.backend, Request(response_format=task.response_format)._grammar)
        constraint.consume(plain[:i])
        return top2_margin(self.rt.backend, self.prompt(task) + plain[:i], constraint.masked)

    def _grammar(self, task: Task):
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import JSON_GBNF

        g = self._grammars.get(task.name)
        if g is None:
            kind = task.response_format["type"]
            if kind == "json_object":
                g = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
            elif kind == "json_schema":
                g = LlamaGrammar.from_json_schema(json.dumps(task.schema), verbose=False)
            else:
                return None
            self._grammars[task.name] = g
        return g

    def _run_llama(self, task: Task, prompt: list[int], temp: float, seed: int | None) -> Answer | None:
        grammar = self._grammar(task)
        if grammar is None:
            return None
        if seed is not None:
            self.llm.set_seed(seed)
        out, _, decode = llama_generate(self.llm, prompt, self.rt.backend.info.eog, self.max_tokens,
                                        top_k=0 if temp else 1, top_p=1.0, min_p=0.0, temp=temp, grammar=grammar)
        text = self.llm.detokenize(out).decode("utf-8", errors="replace")
        tok_s = len(out) / decode if decode > 0 else 0.0  # as the speed bench counts it
        return Answer("llama-python", task.name, seed, text, len(out), tok_s, validator(task)(text))

    def close(self) -> None:
        self.rt.close()


def summarize(answers: list[Answer]) -> dict:
    out: dict = {}
    by = {m: [a for a in answers if a.method == m] for m in METHODS}
    for m, rows in by.items():
        if not rows:
            continue
        out[m] = {"answers": len(rows), "valid": sum(a.valid for a in rows) / len(rows),
                  "median_tok_s": statistics.median(a.tok_s for a in rows),
                  "forced_per_answer": statistics.mean(a.forced for a in rows),
                  "grammar_ms_per_token": statistics.median(a.grammar_ms_per_token for a in rows)}
    key = lambda a: (a.task, a.seed)
    plain = {key(a): a for a in by["plain"]}
    for m in ("default", "llama-python"):
        ratios = [a.tok_s / plain[key(a)].tok_s for a in by[m] if key(a) in plain and plain[key(a)].tok_s > 0]
        if ratios and m in out:
            out[m]["median_speedup_vs_plain"] = statistics.median(ratios)
    llama = {key(a): a for a in by["llama-python"]}
    ratios = [a.tok_s / llama[key(a)].tok_s for a in by["default"] if key(a) in llama and llama[key(a)].tok_s > 0]
    if ratios:
        out["default"]["median_speedup_vs_llama_python"] = statistics.median(ratios)
    return out


def check_greedy(runner: Runner, tasks: list[Task], answers: list[Answer]) -> dict:
    """Greedy ``default`` against greedy ``plain``, token by token: identical, certified near-ties (plain's
    constrained top-two gap at the first differing token below ``NEAR_TIE``; a length difference counts at the
    shorter end) and mismatches."""
    greedy = {(a.method, a.task): a for a in answers if a.seed is None}
    same, ties, bad = 0, [], []
    for task in tasks:
        d, p = greedy.get(("default", task.name)), greedy.get(("plain", task.name))
        if d is None or p is None:
            continue
        if d.ids == p.ids:
            same += 1
            continue
        j = common_prefix(d.ids, p.ids)
        margin = runner.margin_at(task, p.ids, j)
        (ties if margin < NEAR_TIE else bad).append({"task": task.name, "token": j, "margin": round(margin, 3)})
    return {"identical": same, "near_ties": ties, "mismatches": bad, "compared": same + len(ties) + len(bad)}


def main(args) -> int:
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown --methods {', '.join(sorted(unknown))}: use {', '.join(METHODS)}")
    tasks = TASKS[:args.n] if args.n else TASKS
    seeds: list[int | None] = [None] + list(range(1, args.constrained_seeds + 1))
    exact = getattr(args, "exact", False)
    runner = Runner(args.model, args.n_ctx, args.threads, args.draft, args.max_tokens, methods, exact)
    runner_costs = machine.cost_table(runner.rt.backend)  # c(n) on this machine, for BENCHMARKS.md
    answers: list[Answer] = []
    try:
        k = 0
        for task in tasks:
            for seed in seeds:
                order = methods[k % len(methods):] + methods[:k % len(methods)]  # rotated: noise hits all alike
                k += 1
                for m in order:
                    a = runner.run(m, task, seed)
                    if a is not None:
                        answers.append(a)
                        flag = "" if a.valid else "  INVALID"
                        print(f"{task.name:18s} seed={seed!s:4s} {m:13s} {a.tok_s:6.1f} tok/s {a.tokens:4d} tok "
                              f"forced {a.forced:3d}{flag}", flush=True)
        summary = summarize(answers)
        if "default" in summary and "plain" in summary:
            summary["default"]["greedy_vs_plain"] = check_greedy(runner, tasks, answers)
    finally:
        runner.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "draft": args.draft, "exact": exact, "max_tokens": args.max_tokens,
            "seeds": args.constrained_seeds,
            "tasks": len(tasks), **machine.describe(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "verify_cost": runner_costs}
    (out / "structured.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                     "answers": [a.__dict__ for a in answers]}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"written to {out / 'structured.json'}")
    return 0
