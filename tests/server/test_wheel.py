"""The wheel `python -m build` makes (from its sdist) installs into a fresh venv and serves, with its version
from the git tag.

The source tree (tracked and untracked files that git does not ignore) is copied into a new git repository
tagged v7.7.7, so the test builds exactly what is checked out and setuptools-scm has a tag to read. The build
runs without isolation (the test extra holds its backend), so it needs no package index; the venv sees the
test environment's site-packages for torch and the rest, and gets paged itself only from the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import start_server, stop_server

ROOT = Path(__file__).parents[2]
TAG = "7.7.7"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=paged tests", "-c", "user.email=tests@paged.invalid", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in _git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _git(source, "init", "-q")
    _git(source, "add", "-A")
    _git(source, "commit", "-q", "-m", "release")
    _git(source, "tag", f"v{TAG}")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
                   check=True, capture_output=True)
    assert [p.name for p in dist.glob("*.tar.gz")] == [f"paged-{TAG}.tar.gz"]  # the wheel is built from this sdist
    [built] = dist.glob("*.whl")
    return built


def test_the_wheel_holds_every_package_and_its_metadata(wheel: Path) -> None:
    assert wheel.name == f"paged-{TAG}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"paged-{TAG}.dist-info/METADATA").decode()
        entry_points = archive.read(f"paged-{TAG}.dist-info/entry_points.txt").decode()
    # Every module of the four source folders lands under its package name, with the data files beside them.
    for folder, package in (("core", "paged"), ("backends", "paged/backends"), ("models", "paged/models"),
                            ("quant", "paged/quant")):
        for module in [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.c"), *(ROOT / folder).rglob("*.json")]:
            assert f"{package}/{module.relative_to(ROOT / folder)}" in names, module
    assert "Project-URL: Source" in metadata and "Classifier: Programming Language :: Python :: 3" in metadata
    assert "paged = paged.cli.main:main" in entry_points
    assert "cpu = paged.backends.cpu.backend:CPUBackend" in entry_points


def test_the_wheel_serves_from_a_fresh_venv(wheel: Path, tiny_chat_model: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True, with_pip=True)
    python = str(env / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    imported = subprocess.run([python, "-c", "import paged; print(paged.__file__, paged.__version__)"], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.split()
    assert imported == [str(env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
                            / "paged" / "__init__.py"), TAG]
    version = subprocess.run([str(env / "bin" / "paged"), "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert version.stdout.strip() == f"paged {TAG}"

    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", python=python, cwd=tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        completion = client.completions.create(model=str(tiny_chat_model), prompt="one two", max_tokens=4,
                                               extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 4
        assert httpx.get(f"{server.url}/version").json()["version"] == TAG
    finally:
        stop_server(server)
