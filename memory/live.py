"""Live memory accounting: the process's resident set against its budget, and what speculation may use.

llama.cpp reserves the KV cache and compute buffers when a model is loaded, so what still grows during a
run is the verify tree (llama.cpp's output rows and the Python copies of its logits and hidden states:
``node_bytes`` per node) and the drafter's state. Before each draft the speculative loop asks
``node_cap`` how many tree nodes fit the headroom, which gives the degradation order at run time:
1. the tree shrinks to the nodes that fit;
2. with no room for one draft node, drafting stops (plain decoding costs no extra buffers);
3. a context that fills up is handled by the context policy (oldest turns dropped, ``session.py``).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:  # macOS: no /proc; ru_maxrss is the best portable figure (bytes there)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM: ``ru_maxrss`` is inherited across fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if os.uname().sysname == "Darwin" else r * 1024


@dataclass
class MemoryGuard:
    budget: int  # bytes the whole process may hold
    node_bytes: int  # bytes one more verify-tree node needs
    reserve: float = 0.05  # of the budget kept free for allocator slack
    shrinks: int = field(default=0)  # drafts cut short by memory
    stops: int = field(default=0)  # drafts skipped for lack of memory

    @property
    def limit(self) -> int:
        return int(self.budget * (1 - self.reserve))

    def node_cap(self, wanted: int) -> int:
        """How many of ``wanted`` tree nodes (root excluded) fit the headroom now."""
        room = (self.limit - rss_bytes()) // max(self.node_bytes, 1) - 1  # the root's row too
        cap = max(0, min(wanted, room))
        if cap == 0 and wanted > 0:
            self.stops += 1
        elif cap < wanted:
            self.shrinks += 1
        return cap

    def figures(self) -> dict:
        rss = rss_bytes()
        return {"budget": self.budget, "rss": rss, "peak_rss": peak_rss_bytes(), "headroom": self.limit - rss,
                "tree_shrinks": self.shrinks, "draft_stops": self.stops}
