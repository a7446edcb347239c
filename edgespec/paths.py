"""Where edgespec keeps its files: ``$EDGESPEC_HOME``, else ``$XDG_CACHE_HOME/edgespec``, else ``~/.cache/edgespec``.
(Neutral: it imports nothing of edgespec, so backends, memory and drafters may all use it.)"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("EDGESPEC_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgespec"
    )
    return Path(root)
