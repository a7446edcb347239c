"""What machine a speed figure was measured on: the CPU, its SIMD extensions, and the target's verify-cost
table c(n) (the time of one verify of n rows, in single decoding steps), measured on the loaded model."""

from __future__ import annotations

import os
import platform

from edgespec.backends import hugepages
from edgespec.controller import CALIBRATION_SIZES, calibrate

SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
        "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "i8mm", "bf16")


def cpu_name() -> str:
    """The CPU's model name; on x86 with its family and model numbers, since a hypervisor may show several
    generations under one name (e.g. "AMD EPYC" for AVX2-only and AVX-512 parts)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model")
    if name:
        if "cpu family" in fields and "model" in fields:
            return f"{name} (family {fields['cpu family']}, model {fields['model']})"
        return name
    if platform.system() == "Darwin":
        import subprocess

        r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    return platform.processor() or platform.machine()


def simd_flags() -> list[str]:
    """The SIMD extensions this CPU reports that matter to llama.cpp's kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        flags = []
    return [f for f in SIMD if f in flags]


def describe() -> dict:
    return {"cpu": cpu_name(), "simd": simd_flags(), "cores": os.cpu_count(), "machine": platform.machine(),
            "thp": hugepages.thp_mode()}


def cost_table(backend, prefix: int = 500, reps: int = 5,
               sizes: tuple[int, ...] = CALIBRATION_SIZES) -> dict[int, float]:
    """c(n) for the sizes, in single steps: verify time of an n-row chain over a ``prefix``-token cache, best of
    ``reps``, divided by the one-row time. The cache is left empty."""
    text = "def f(x):\n    return x * 2\n\n" * 64
    tokens = backend.tokenize(text, add_special=True)[:prefix]
    backend.truncate(0)
    backend.prefill(tokens)
    secs = calibrate(backend, sizes, reps)
    backend.truncate(0)
    return {n: round(t / secs[1], 3) for n, t in secs.items()}


def cost_line(table: dict) -> str:
    return " ".join(f"{n}:{c:.2f}" for n, c in sorted(table.items(), key=lambda kv: int(kv[0])))


def break_even(table: dict, speedup: float = 1.0, max_depth: int = 6) -> dict[int, float | None]:
    """For each chain depth L, the acceptance rate a (the same at every depth) a drafter needs for
    ``speedup`` over plain decoding on this cost table, drafting for free: tokens per verify
    ``1 + a + ... + a^L`` over the verify cost ``c(L + 1)``. None where even a = 1 falls short."""
    costs = {int(n): float(c) for n, c in table.items()}
    out: dict[int, float | None] = {}
    for depth in range(1, max_depth + 1):
        c = costs.get(depth + 1)
        if c is None:
            continue
        if (depth + 1) / c < speedup:
            out[depth] = None
            continue
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if sum(mid ** i for i in range(depth + 1)) / c < speedup:
                lo = mid
            else:
                hi = mid
        out[depth] = round(hi, 3)
    return out


def break_even_line(table: dict, speedup: float) -> str:
    parts = [f"depth {d}: {'-' if a is None else f'{a:.2f}'}" for d, a in break_even(table, speedup).items()]
    return ", ".join(parts)
