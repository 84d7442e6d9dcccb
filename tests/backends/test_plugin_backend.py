"""An out-of-tree backend, installed as a distribution of its own, is found and preferred over the built-ins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from stevedore import ExtensionManager

from paged.backends.registry import Registered, choose, discover
from tests.plugin_backends import write_backend_plugin

PLUGIN = '''
from paged.backends.cpu.backend import CPUBackend
from paged.backends.interface import Availability


class FakeAccelerator(CPUBackend):
    name = "fake-accel"

    @classmethod
    def is_available(cls):
        return Availability(True, "a fake accelerator for the registry test")
'''


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Registered]:
    """A distribution "fake-accel-plugin" (module + dist-info with its entry point) on sys.path; discover()."""
    write_backend_plugin(tmp_path, "fake-accel", "fake_accel_plugin", "FakeAccelerator", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    # stevedore remembers a group's entry points per process, and this one looked before the install.
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    yield discover()
    sys.modules.pop("fake_accel_plugin", None)


def test_plugin_is_found_and_can_be_named(installed_plugin):
    names = [r.name for r in installed_plugin]
    assert {"fake-accel", "cpu", "cuda", "rocm", "tpu", "gaudi"} <= set(names)
    assert choose(installed_plugin, "fake-accel").backend.__name__ == "FakeAccelerator"


def test_plugin_comes_first(installed_plugin):
    assert installed_plugin[0].name == "fake-accel" and installed_plugin[0].source == "fake-accel-plugin"
    assert choose(installed_plugin).name == "fake-accel"
