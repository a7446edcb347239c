"""The benchmarks, one module each (``edgespec bench`` picks one by its options):

* ``speed``: ``edgespec bench``: decoding methods side by side on the same prompts, greedy outputs checked;
* ``memory``: ``edgespec bench --memory-budgets``: throughput and real peak RSS under memory budgets, each run in
  a fresh worker process (``python -m edgespec.benches.memory JOB-JSON``);
* ``online``: ``edgespec bench --online N``: acceptance with and without online adaptation of the drafter;
* ``server``: ``edgespec bench --server`` (or ``python -m edgespec.benches.server``): ``edgespec serve`` over
  HTTP against the in-process API, the prompt cache, predicted outputs and memory over many requests;
* ``prompts``: the prompt sets they share (HumanEval, ``chat``, ``adversarial``) and ``load_prompts``.

Importing this package loads none of them.
"""
