"""Find backends through the `paged.backends` entry-point group and pick the one to run on.

Built-in backends are declared in our own pyproject exactly as an out-of-tree vendor package declares
its own, so both travel the same path. A plugin that fails to import is reported, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from stevedore import ExtensionManager

from paged.backends.interface import Backend, BackendFacts
from paged.errors import UserError

logger = logging.getLogger(__name__)

GROUP = "paged.backends"
BUILTIN_PRIORITY = ("cuda", "rocm", "tpu", "gaudi", "cpu")
BUILTIN_DIST = "paged"


@dataclass
class Registered:
    """One entry point of the group: its class when it loaded, or why it did not."""

    name: str
    source: str  # "built-in" or the distribution that ships it
    backend: type[Backend] | None
    load_error: str | None = None

    def facts(self) -> BackendFacts:
        if self.backend is None:
            return BackendFacts(self.name, False, f"plugin failed to load: {self.load_error}", "?", "?", source=self.source)
        return self.backend.facts(self.source)


def _source(entry_point) -> str:
    dist = getattr(entry_point, "dist", None)
    name = getattr(dist, "name", None) or BUILTIN_DIST
    return "built-in" if name.replace("_", "-") == BUILTIN_DIST else name


def discover() -> list[Registered]:
    """Every registered backend, in selection order: out-of-tree plugins first, then built-in priority."""
    failures: dict[str, str] = {}

    def on_failure(_manager, entry_point, error):
        failures[entry_point.name] = f"{type(error).__name__}: {error}"
        logger.warning("backend plugin %r failed to load: %s", entry_point.name, error)

    manager = ExtensionManager(namespace=GROUP, invoke_on_load=False, on_load_failure_callback=on_failure)
    # stevedore's cached entry points carry no distribution: importlib.metadata says who ships each one.
    sources = {ep.name: _source(ep) for ep in entry_points(group=GROUP)}
    found = {ext.name: Registered(ext.name, sources.get(ext.name, "built-in"), ext.plugin) for ext in manager}
    for name, error in failures.items():
        found.setdefault(name, Registered(name, sources.get(name, "built-in"), None, error))

    def order(reg: Registered) -> tuple[int, int, str]:
        builtin = reg.source == "built-in"
        rank = BUILTIN_PRIORITY.index(reg.name) if reg.name in BUILTIN_PRIORITY else len(BUILTIN_PRIORITY)
        return (int(builtin), rank, reg.name)

    return sorted(found.values(), key=order)


def choose(registered: list[Registered], device: str | None = None) -> Registered:
    """The backend to run on: the named one (which must be available) or the first available one."""
    if device:
        by_name = {r.name: r for r in registered}
        if device not in by_name:
            raise UserError(f"unknown device {device!r}; registered backends: {', '.join(by_name) or 'none'}")
        chosen = by_name[device]
        facts = chosen.facts()
        if not facts.available:
            raise UserError(f"device {device!r} is not available here: {facts.reason}")
        return chosen
    for reg in registered:
        if reg.backend is not None and reg.backend.is_available():
            return reg
    raise UserError("no backend is available: " + "; ".join(f"{r.name}: {r.facts().reason}" for r in registered))


def require_device(device: str | None) -> None:
    """Fail in one line now where the named device is unknown or unavailable: before a model is fetched for it."""
    choose(discover(), device)


def load_backend(device: str | None = None) -> Backend:
    """Instantiate the chosen backend, logging which one and why."""
    chosen = choose(discover(), device)
    assert chosen.backend is not None
    why = "requested" if device else "first available in priority order"
    logger.info("backend %s (%s): %s", chosen.name, why, chosen.backend.is_available().reason)
    return chosen.backend()
