"""edgespec: local LLMs with lossless speculative decoding under a fixed memory budget.

    import edgespec
    rt = edgespec.load("qwen2.5-coder-0.5b")
    print(rt.generate("def fib(n):", max_tokens=64).text)
"""

__version__ = "0.1.0"

from edgespec.build import load  # noqa: E402
from edgespec.options import LoadOptions, Request  # noqa: E402
from edgespec.registry import ModelError  # noqa: E402
from edgespec.runtime import BusyError, ClosedError, Completion, Generation, Runtime  # noqa: E402

__all__ = ["load", "LoadOptions", "Request", "Runtime", "Generation", "Completion", "ModelError", "BusyError",
           "ClosedError", "__version__"]
