"""Transparent huge pages for the big buffers a backend allocates (Linux).

llama.cpp's CPU backend keeps the weights (and its repacked copies of them, the KV cache, the compute
buffers) in plain anonymous memory. Under the usual THP setting ``madvise`` that memory stays in 4 KiB
pages, so a decoding step, which streams all the weights, walks ~300k page-table entries (more under a
hypervisor's nested paging). Measured on an AMD EPYC Zen 3 VM with qwen2.5-coder-1.5b: the 1-row step
83 -> 63-70 ms, plain decoding 1.056x (docs/bench/history.md, session 8).

``snapshot`` records the process's large anonymous mappings; ``collapse_new`` marks the ones that appeared
or grew since then ``MADV_HUGEPAGE`` (pages touched later are faulted in huge) and collapses the pages
already written into huge pages (``MADV_COLLAPSE``, Linux 6.1+), 2 MiB at a time. Elsewhere, or where the
kernel refuses, nothing changes: it is a hint, never an error.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass

HUGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
MIN_BYTES = 32 << 20  # smaller mappings are not worth the syscalls

Region = tuple[int, int]


@dataclass
class Collapsed:
    bytes: int = 0  # bytes of the new mappings in huge pages after the call
    seconds: float = 0.0


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), None off Linux."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else None


def enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else on unless ``EDGESPEC_HUGE_PAGES=0``; only on Linux with THP not ``never``."""
    if flag is None:
        flag = os.environ.get("EDGESPEC_HUGE_PAGES", "1") != "0"
    return bool(flag) and sys.platform.startswith("linux") and thp_mode() not in (None, "never")


def snapshot(min_bytes: int = MIN_BYTES) -> set[Region]:
    """The large private anonymous read-write mappings of this process, as (start, end) addresses."""
    out = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if not parts[1].startswith("rw") or (len(parts) > 5 and parts[5] != "[heap]"):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if hi - lo >= min_bytes:
                    out.add((lo, hi))
    except OSError:
        pass
    return out


def collapse_new(before: set[Region], min_bytes: int = MIN_BYTES) -> Collapsed:
    """Huge pages for the large anonymous mappings not in ``before`` (new, or grown and so changed)."""
    t0 = time.perf_counter()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for lo, hi in sorted(snapshot(min_bytes) - before):
        start, end = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        if end <= start or libc.madvise(start, end - start, MADV_HUGEPAGE) != 0:
            continue
        for a in range(start, end, HUGE):  # pages never touched cannot collapse; the rest can
            done += HUGE if libc.madvise(a, HUGE, MADV_COLLAPSE) == 0 else 0
    return Collapsed(done, time.perf_counter() - t0)


def anon_huge_bytes() -> int:
    """Bytes of this process in transparent huge pages (``AnonHugePages``), 0 where unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
