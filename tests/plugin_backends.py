"""Out-of-tree backends for tests: a module and its dist-info, as `pip install` would leave them."""

from __future__ import annotations

from pathlib import Path


def write_backend_plugin(folder: Path, backend_name: str, module: str, class_name: str, source: str) -> None:
    """`module`.py holding `source` and a distribution whose entry point registers its `class_name` as the
    backend `backend_name`; put `folder` on sys.path (or PYTHONPATH) to install it."""
    (folder / f"{module}.py").write_text(source)
    dist = folder / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[paged.backends]\n{backend_name} = {module}:{class_name}\n")
