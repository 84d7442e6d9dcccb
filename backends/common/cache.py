"""Where paged keeps what it builds or downloads once: converted models, the default model, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$PAGED_CACHE_DIR, else ~/.cache/paged."""
    return Path(os.environ.get("PAGED_CACHE_DIR") or Path.home() / ".cache" / "paged")
