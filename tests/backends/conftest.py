"""The conformance suite's fixtures: every backend available here, and the compatibility-matrix report.

Tests that take `backend_name` run once per backend that registry.discover() finds available (the TPU
backend on JAX's CPU platform when PAGED_TPU_ALLOW_CPU=1). Tests marked `feature(...)` have their
outcomes recorded per backend; with PAGED_MATRIX_OUT set, the session writes them there as a JSON
report (where = PAGED_MATRIX_WHERE, else "CPU CI" under CI, else the host name) for `paged info --matrix`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before JAX starts (it reads this once): two host devices, so the TPU backend's mesh collectives have peers.
_TWO_HOST_DEVICES = "--xla_force_host_platform_device_count=2"
if _TWO_HOST_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TWO_HOST_DEVICES}".strip()

from paged.backends.interface import Backend  # noqa: E402
from paged.backends.registry import discover  # noqa: E402

_RESULTS = pytest.StashKey[dict]()


def available() -> dict[str, type[Backend]]:
    return {r.name: r.backend for r in discover() if r.backend is not None and r.backend.is_available()}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "feature(*names): compatibility-matrix features a conformance test verifies")
    config.stash[_RESULTS] = {}


@pytest.fixture(scope="module", params=list(available()))
def backend_name(request: pytest.FixtureRequest) -> str:
    """Module-scoped, so pytest runs one backend's tests together and sets the next one up only after."""
    return request.param


@contextlib.contextmanager
def _around(name: str) -> Iterator[None]:
    """What a backend needs from the suite beyond the Backend interface (only the TPU backend needs any).

    The TPU backend turns torchax on process-wide; it is turned off after its tests so the rest of the
    session runs plain torch.
    """
    if name != "tpu":
        yield
        return
    from paged.backends.tpu import runtime

    try:
        yield
    finally:
        runtime.disable_torchax()


@pytest.fixture(scope="module")
def backend(backend_name: str) -> Iterator[Backend]:
    with _around(backend_name):
        yield available()[backend_name]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    mark = item.get_closest_marker("feature")
    params = getattr(item, "callspec", None)
    if mark and params and "backend_name" in params.params and (report.when == "call" or not report.passed):
        backend = item.config.stash[_RESULTS].setdefault(params.params["backend_name"], {"features": {}, "dtypes": []})
        for feature in mark.args:
            backend["features"].setdefault(feature, []).append(report.outcome)
        dtype = params.params.get("dtype")
        if report.passed and dtype is not None:
            backend["dtypes"].append(str(dtype).removeprefix("torch."))
    return report


def _status(outcomes: list[str]) -> str:
    for status in ("failed", "passed"):
        if status in outcomes:
            return status
    return "skipped"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path, results = os.environ.get("PAGED_MATRIX_OUT"), session.config.stash[_RESULTS]
    if not path or not results:
        return
    where = os.environ.get("PAGED_MATRIX_WHERE") or ("CPU CI" if os.environ.get("CI") else socket.gethostname())
    backends = available()
    report = {
        "where": where,
        "date": datetime.date.today().isoformat(),
        "backends": {
            name: {
                "features": {f: _status(o) for f, o in result["features"].items()},
                "dtypes": sorted(set(result["dtypes"])),
                "note": backends[name].is_available().reason if name in backends else "",
            }
            for name, result in results.items()
        },
    }
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
