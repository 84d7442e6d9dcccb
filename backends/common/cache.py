"""Where paged keeps what it builds or downloads once: converted models, the default model, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$PAGED_CACHE_DIR, else paged/ under the XDG cache folder ($XDG_CACHE_HOME, else ~/.cache)."""
    if os.environ.get("PAGED_CACHE_DIR"):
        return Path(os.environ["PAGED_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "paged"
