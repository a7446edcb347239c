"""Print CMAKE_ARGS for building llama-cpp-python on this machine.

llama.cpp's default native build enables AMX on CPUs that have it and then crashes in llama_decode
(design notes, section 2). So on x86-64 Linux the build is never native: each SIMD extension is
switched on only when /proc/cpuinfo lists it, and AMX stays off unless ``EDGESPEC_AMX=1`` asks for it (then
``scripts/setup.sh`` builds from a source patched by ``scripts/patch_llama.py``, which fixes the crash). With
AMX, prompts are processed ~1.6x faster and single-token decoding ~3% slower (docs/bench/history.md, session 10).
On macOS arm64, Metal is the default.
"""

import os
import platform
import sys

FLAGS = [  # (cpuinfo flag, ggml option)
    ("sse4_2", "GGML_SSE42"), ("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"), ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"), ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
]


def cmake_args() -> str:
    if sys.platform == "darwin":
        return "-DGGML_METAL=ON" if platform.machine() == "arm64" else ""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""  # other CPUs: llama.cpp's defaults
    try:
        with open("/proc/cpuinfo") as f:
            have = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        have = set()
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF"]
    args += [f"-D{opt}={'ON' if flag in have else 'OFF'}" for flag, opt in FLAGS]
    if os.environ.get("EDGESPEC_AMX") == "1" and {"amx_tile", "amx_int8", "avx512_vnni"} <= have:
        args += ["-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=ON", f"-DGGML_AMX_BF16={'ON' if 'amx_bf16' in have else 'OFF'}"]
    return " ".join(args)


if __name__ == "__main__":
    print(cmake_args())
