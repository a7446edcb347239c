"""The ``edgespec`` command: models, generate, chat (and, from later modules, bench and plan)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from edgespec import __version__, paths, registry
from edgespec.backends.base import BackendError
from edgespec.benches.prompts import SETS as PROMPT_SETS
from edgespec.generate import PromptTooLongError, Stats


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL,
                   help=f"registry id or path to a .gguf file (default: {registry.DEFAULT_MODEL})")
    p.add_argument("--backend", default="auto", choices=["auto", "llama.cpp", "mlx"])
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores, at most 8)")
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"])
    p.add_argument("--draft", default="auto",
                   help="speculative drafter: auto (context n-grams, the model's ReDrafter head while it pays, a "
                        "request's prediction: per step whichever pays most), ngram, "
                        "redrafter[:<weights.npz>], model:<id> (same-vocabulary draft model), xvocab:<id> (draft "
                        "model with another vocabulary), none (default: auto)")
    p.add_argument("--draft-depth", type=int, default=None, help="fixed draft depth (default: cost-aware controller)")
    p.add_argument("--draft-width", type=int, default=None, help="candidates per draft node / beams")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt the ReDrafter head online to your own traffic, between replies, saved per user "
                        "(--adapt: from the first reply; default: once the head has shown that it pays on this "
                        "machine, where torch is installed, the `train` extra; `edgespec drafter reset` forgets it)")
    p.add_argument("--exact", action="store_true",
                   help="verify only batches whose logits are bit-identical to plain decoding (greedy output "
                        "identical to --draft none, at some cost in speed)")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the weights and KV cache in transparent huge pages on Linux: faster decoding, ~1-3 s "
                        "more to load (default: on unless EDGESPEC_HUGE_PAGES=0)")
    p.add_argument("--memory-budget", default=None,
                   help="run within this much RAM (e.g. 1.5GB): context, KV type, batch and drafter are planned "
                        "to fit, and the draft tree is capped to the live headroom; refused if too small")


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=512)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")


def _gen_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                seed=a.seed, stop=tuple(a.stop))


def _options(a: argparse.Namespace):
    """Load options and a request checked from the arguments, before any model is loaded."""
    from edgespec.build import LoadOptions, check
    from edgespec.runtime import Request

    opts = LoadOptions(n_ctx=a.n_ctx, n_threads=a.threads, kv_type=a.kv_type, backend=a.backend, draft=a.draft,
                       draft_depth=a.draft_depth, draft_width=a.draft_width, memory_budget=a.memory_budget,
                       adapt="auto" if a.adapt is None else a.adapt, exact=a.exact, huge_pages=a.huge_pages)
    Request(**_gen_kwargs(a))
    check(a.model, opts)
    return opts


def _load(a: argparse.Namespace, opts):
    from dataclasses import asdict

    from edgespec.build import load

    rt = load(a.model, **asdict(opts))
    for line in rt.notices:
        print(f"edgespec: {line}", file=sys.stderr)
    return rt


def _print_stats(stats: Stats) -> None:
    print(f"[{stats.line()}]", file=sys.stderr, flush=True)


# ---- commands ----------------------------------------------------------------------------------
def cmd_models(a: argparse.Namespace) -> int:
    if a.action == "list":
        for r in registry.listing():
            mark = "pulled" if r["pulled"] else "-"
            print(f"{r['id']:<22} {r['size_mb']:>6} MB  {mark:<7} {r['description']}")
        return 0
    if not a.id:
        raise ValueError(f"`edgespec models {a.action}` needs a model id")
    if a.action == "pull":
        path = registry.pull(a.id)
        print(path)
    elif a.action == "path":
        print(registry.resolve(a.id, download=False))
    elif a.action == "rm":
        registry.remove(a.id)
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = " ".join(a.prompt) if a.prompt and a.prompt != ["-"] else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass it as an argument or on stdin")
    opts = _options(a)
    with _load(a, opts) as rt:  # closing stops a running adaptation after its step and saves it
        if a.raw:
            gen = rt.stream(prompt, **_gen_kwargs(a))
        else:
            msgs = [{"role": "system", "content": a.system}] if a.system else []
            msgs.append({"role": "user", "content": prompt})
            gen = rt.chat(msgs, stream=True, **_gen_kwargs(a))
        for chunk in gen:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if a.json:
            print(json.dumps(gen.stats.as_dict()), file=sys.stderr)
        else:
            _print_stats(gen.stats)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from edgespec.backends.convert import convert

    bits = a.bits if a.bits in ("gguf", "none") else int(a.bits)
    print(convert(registry.resolve(a.model), bits=bits, force=a.force))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from edgespec import drafters
    from edgespec.build import plan_for
    from edgespec.memory.planner import parse_size

    spec = drafters.parse(a.draft, a.model)
    adapt = a.adapt is True and spec.head is not None and drafters.trainer_available()  # "auto": counted once it starts
    p = plan_for(registry.resolve(a.model), parse_size(a.memory_budget), a.n_ctx, a.min_ctx, spec, adapt, a.backend)
    print(p.describe())
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    if a.online:
        from edgespec.benches.online import main as online_main

        return online_main(a)
    if a.memory_budgets:
        from edgespec.benches.memory import main as memory_main

        return memory_main(a)
    from edgespec.benches.speed import main as speed_main

    return speed_main(a)


def cmd_bench_server(argv: list[str]) -> int:
    """``edgespec bench --server ...``: the server bench, with every other option of the command its own."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"edgespec bench --server needs {', '.join(missing)}: pip install 'edgespec[dev]'", file=sys.stderr)
        return 2
    from edgespec.benches.server import main as server_main

    return server_main([x for x in argv if not _is_server_flag(x)], prog="edgespec bench --server")


def _is_server_flag(arg: str) -> bool:
    """``--server`` or an abbreviation argparse would take for it (no other bench option starts with ``--s``)."""
    return len(arg) > 2 and "--server".startswith(arg)


HELP = "/reset clears the conversation, /stats shows statistics, /exit quits (Ctrl-C stops a reply)"


def cmd_chat(a: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    opts = _options(a)
    with _load(a, opts) as rt:  # closing saves the adapted drafter state
        return _chat_loop(a, rt)


def _chat_loop(a: argparse.Namespace, rt) -> int:
    sess = rt.session(system=a.system)
    info = rt.backend.info
    print(f"edgespec chat: {info.name} on {rt.backend.name}, context {rt.backend.n_ctx}, drafter "
          f"{rt.drafter.name if rt.drafter else 'none'}. {HELP}", file=sys.stderr)
    if rt.plan is not None:
        print(rt.plan.describe(), file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(type /exit or press Ctrl-D to quit)", file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            sess.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd == "/stats":
            _show_session_stats(rt, sess)
            continue
        if cmd.startswith("/") and cmd.split()[0] in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        stop = threading.Event()
        old = signal.signal(signal.SIGINT, lambda *_, ev=stop: ev.set())
        try:
            dropped_before = sess.dropped
            for chunk in sess.send(line, cancel=stop, **_gen_kwargs(a)):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except PromptTooLongError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, old)
        print()
        if sess.dropped > dropped_before:
            print(f"(context full: dropped the {sess.dropped - dropped_before} oldest message(s))", file=sys.stderr)
        if sess.last_stats:
            if sess.last_stats.finish_reason == "context":
                print("(reply cut: the context is full; /reset to start over)", file=sys.stderr)
            _print_stats(sess.last_stats)


def _show_session_stats(rt, sess) -> None:
    mem = rt.memory()
    turns = sess.turns
    gen = sum(s.generated_tokens for s in turns)
    dec = sum(s.decode_s for s in turns)
    print(f"turns: {len(turns)}, messages: {len(sess.messages)}, dropped: {sess.dropped}", file=sys.stderr)
    print(f"generated: {gen} tokens, {gen / dec if dec else 0:.1f} tok/s overall", file=sys.stderr)
    print(f"KV cache: {mem.n_cached}/{mem.n_ctx} tokens, {mem.kv_used_bytes / 2**20:.1f} MiB used of "
          f"{mem.kv_reserved_bytes / 2**20:.1f} MiB; weights {mem.weights_bytes / 2**20:.0f} MiB", file=sys.stderr)
    live = rt.memory_stats()
    line = f"memory: RSS {live['rss'] / 2**20:.0f} MiB, peak {live['peak_rss'] / 2**20:.0f} MiB"
    if "budget" in live:
        line += (f" of a {live['budget'] / 2**20:.0f} MiB budget (headroom {live['headroom'] / 2**20:.0f} MiB; "
                 f"trees capped {live['tree_shrinks']}x, drafting skipped {live['draft_stops']}x)")
    print(line + f"; drafter {live['drafter'] / 2**20:.1f} MiB", file=sys.stderr)
    if sess.last_stats:
        print(f"last reply: {sess.last_stats.line()}", file=sys.stderr)


def cmd_drafter(a: argparse.Namespace) -> int:
    from edgespec.models.drafting.online import state_path

    targets = [a.target] if a.target else list(registry.MODELS)
    for t in targets:
        p = state_path(paths.cache_dir(), registry.model_key(t))
        if p.exists():
            p.unlink()
            print(f"removed the adapted drafter state for {t} ({p})")
        else:
            print(f"no adapted drafter state for {t}")
    return 0


def cmd_train_drafter(a: argparse.Namespace) -> int:
    from edgespec.models.training import collect
    from edgespec.models.training.train_redrafter import TrainConfig, train_collected

    # the collection's knobs: flag -> (CollectConfig field, value given)
    knobs = {"--instructions-per-shard": ("prompts_per_shard", a.instructions_per_shard),
             "--texts-per-shard": ("texts_per_shard", a.texts_per_shard), "--rows": ("rows", a.rows),
             "--seed": ("seed", a.seed)}
    given = {field: v for _, (field, v) in knobs.items() if v is not None}
    if a.train_only and (given or a.positions):
        flags = [f for f, (_, v) in knobs.items() if v is not None] + (["--positions"] if a.positions else [])
        raise ValueError(f"{', '.join(flags)} shape a collection: --train-only collects nothing")
    if a.train_only and a.collect_only:
        raise ValueError("--train-only and --collect-only exclude each other")
    data_dirs = [Path(d) for d in a.data_dir] if a.data_dir else [collect.default_dir(a.target)]
    if not a.train_only:
        if len(data_dirs) > 1:
            raise ValueError("a collection goes to one --data-dir")
        shards = collect.run(a.target, a.positions or 2_000_000, threads=a.threads, out_dir=data_dirs[0],
                             cfg=collect.CollectConfig(**given))
        print(f"{len(shards)} shards, {sum(collect.shard_positions(p) for p in shards)} positions in {data_dirs[0]}")
        if a.collect_only:
            return 0
    for d in data_dirs:
        if not list(d.glob("shard_*.npz")):
            raise ValueError(f"no collected shards in {d}: collect them first with --collect-only")
    tc = TrainConfig(steps=a.steps, batch=a.batch, n_draft=a.draft_vocab, depth=a.depth, depth_weight=a.depth_weight,
                     d_rnn=a.d_rnn, n_blocks=a.blocks, lr=a.lr, threads=a.threads, time_budget_s=a.time_budget)
    out = Path(a.out) if a.out else paths.cache_dir() / "drafters" / f"redrafter-{a.target}.npz"
    tr = train_collected(a.target, data_dirs, out, tc)
    last = next((r["held_out"] for r in reversed(tr.history) if "held_out" in r), {})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), model card {out.with_suffix('.md')}")
    print(f"held-out greedy chain acceptance per depth: {[round(x, 3) for x in last.get('chain_accept', [])]}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"edgespec serve needs {' and '.join(missing)}: pip install 'edgespec[server]'", file=sys.stderr)
        return 2
    from edgespec.server import main as serve_main

    return serve_main(a)


# ---- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgespec", description="Local LLMs with lossless speculative decoding.")
    ap.add_argument("--version", action="version", version=f"edgespec {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list, pull or locate models")
    p.add_argument("action", choices=["list", "pull", "path", "rm"])
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="one-shot generation (prompt as arguments or on stdin)")
    _add_model_args(p)
    _add_gen_args(p)
    p.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print the stats as JSON on stderr")
    p.add_argument("prompt", nargs="*")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmark decoding methods side by side on the same prompts")
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    p.add_argument("--prompts", default="humaneval", choices=list(PROMPT_SETS))
    p.add_argument("--n", type=int, default=20, help="number of prompts (default 20)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--methods", default="plain,llama-python,anchor-2,anchor-10,ngram",
                   help="comma-separated: plain, llama-python, anchor-K, ngram[@D[xW]], redrafter[@D[xW]], auto, "
                        "model:<id>[@D]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench for the C++ baseline")
    p.add_argument("--as-users", action="store_true",
                   help="load each method as a user gets it (edgespec.load with default options, adaptation "
                        "included, a backend each) and send the requests back to back; methods: plain, auto, "
                        "auto-noadapt, ngram, redrafter (+exact); background work is waited for between methods")
    p.add_argument("--follow", action="store_true",
                   help="with --as-users: after each reply send the next prompt at once and report its speed")
    p.add_argument("--out", default="bench_out/latest")
    p.add_argument("--memory-budgets", default=None,
                   help="memory-limit benchmark instead: comma-separated budgets (e.g. 1GB,1.5GB,plain+10%%), "
                        "each run in a fresh process that records its peak RSS")
    p.add_argument("--draft", default="auto", help="drafter for --memory-budgets runs (default: auto)")
    p.add_argument("--online", type=int, default=0,
                   help="online-adaptation benchmark instead: stream this many HumanEval prompts with and without "
                        "adapting the ReDrafter head")
    p.add_argument("--online-depth", type=int, default=4,
                   help="fixed draft depth of the --online runs, so that tokens/verify measures the drafter itself "
                        "(0: the cost-aware controller)")
    p.add_argument("--chat-tokens", type=int, default=64, help="tokens per turn of the 10-turn chat (--memory-budgets)")
    p.add_argument("--server", action="store_true",
                   help="server benchmark instead (edgespec serve against the in-process API): every other option "
                        "goes to it; `edgespec bench --server --help` lists them")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="convert a GGUF model to MLX weights (done automatically on first MLX use)")
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    p.add_argument("--bits", default="gguf", choices=["gguf", "4", "8", "none"],
                   help="gguf: keep llama.cpp's own quantized codes (default); 4/8: MLX re-quantization; none: f16")
    p.add_argument("--force", action="store_true", help="convert again even if a cached conversion exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plan", help="plan context, KV type and drafting for a memory budget")
    p.add_argument("--model", "-m", default=registry.DEFAULT_MODEL)
    p.add_argument("--memory-budget", required=True, help="e.g. 1.5GB or 800MB")
    p.add_argument("--n-ctx", type=int, default=4096, help="wanted context (default 4096)")
    p.add_argument("--min-ctx", type=int, default=512, help="smallest acceptable context (default 512)")
    p.add_argument("--draft", default="auto", help="drafter to plan for (as for chat), or 'none'")
    p.add_argument("--backend", default="auto", choices=["auto", "llama.cpp", "mlx"],
                   help="backend to plan for (MLX holds an f16 KV cache only)")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=False,
                   help="count online adaptation of the ReDrafter head from the start, as loading with --adapt "
                        "does (default: only what is resident; adaptation that starts later, once the head pays, "
                        "starts only where the headroom takes it)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train-drafter",
                       help="collect distillation data from a target (resumable) and train a ReDrafter head")
    p.add_argument("--target", required=True, help="target model id (or .gguf path)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="draft depths trained")
    p.add_argument("--draft-vocab", type=int, default=16384, help="draft vocabulary size")
    p.add_argument("--depth-weight", type=float, default=1.0,
                   help="loss weight of depth j is DEPTH_WEIGHT ** (j - 1) (default 1: every depth alike)")
    p.add_argument("--d-rnn", type=int, default=256, help="the head's RNN state size")
    p.add_argument("--blocks", type=int, default=1, help="the head's residual blocks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--time-budget", type=float, default=None,
                   help="fit the training steps into this many seconds (measured on the first steps)")
    p.add_argument("--train-only", action="store_true",
                   help="train on the collection in --data-dir (made with --collect-only), collecting nothing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="weights file (default: the user's drafter directory)")
    p.add_argument("--collect-only", action="store_true",
                   help="only collect the distillation data (resumable: run it again to continue)")
    p.add_argument("--positions", type=int, default=None,
                   help="positions to collect (default 2000000)")
    p.add_argument("--instructions-per-shard", type=int, default=None,
                   help="instructions the target answers per shard (default 32; 0: only "
                        "teacher-forced text)")
    p.add_argument("--texts-per-shard", type=int, default=None,
                   help="teacher-forced windows per shard (default 16)")
    p.add_argument("--rows", type=int, default=None, help="rows per decode (default 64)")
    p.add_argument("--seed", type=int, default=None, help="the material's order (default 0)")
    p.add_argument("--data-dir", default=None, action="append",
                   help="collection directory (default ~/.cache/edgespec/distill/<target>-v2); with --train-only "
                        "it may be repeated to train on several collections")
    p.set_defaults(func=cmd_train_drafter)

    p = sub.add_parser("drafter", help="manage the online-adapted drafter state")
    p.add_argument("action", choices=["reset"], help="reset: forget what the drafter learned from your traffic")
    p.add_argument("--target", default=None, help="model id (default: all)")
    p.set_defaults(func=cmd_drafter)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(p)
    _add_gen_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the 'server' extra)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $EDGESPEC_API_KEY; "
                                                   "none: no key)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model; beyond it 429 with Retry-After (default 16)")
    p.add_argument("--cache-entries", type=int, default=8,
                   help="conversations whose KV state the prompt cache keeps (default 8; 0 turns it off)")
    p.add_argument("--stream-interval", type=float, default=0,
                   help="milliseconds between streamed chunks at most: the text of the tokens decoded meanwhile goes "
                        "in one chunk, the first at once (default 0: a chunk per token)")
    p.add_argument("--cache-size", default="1GB",
                   help="byte cap of the prompt cache (default 1GB; under --memory-budget at most what the plan "
                        "leaves free)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="tokens a chat answer may have when a request sets no max_tokens (default 2048, at most what "
                        "the context leaves)")
    p.add_argument("--max-body", default=None,
                   help="largest request body, e.g. 2MB (default: 64 bytes per token of context plus 64 KiB, room for "
                        "a prompt and a prediction of the whole context)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take from its arrival, waiting included; then it ends with an error "
                        "(default: no limit)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="another host name a loopback server answers for (repeatable; localhost, 127.0.0.1 and "
                        "[::1] always are; other Host headers get 403)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="an origin whose web pages may call the server (repeatable; default: none, CORS off)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and any(_is_server_flag(x) for x in argv[1:]):  # it parses its own options
        run = lambda: cmd_bench_server(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        run = lambda: args.func(args) or 0
    try:
        return run()
    except (registry.ModelError, PromptTooLongError, BackendError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
