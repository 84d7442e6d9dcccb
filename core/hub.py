"""Models named by their Hugging Face Hub id, fetched with huggingface_hub into its cache.

huggingface_hub does the rest as every Hub tool does: HF_HOME / HF_HUB_CACHE for where the cache is,
HF_HUB_OFFLINE=1 for resolving from it alone, HF_TOKEN (or `hf auth login`) for private and gated
repositories, HF_ENDPOINT for a mirror. Only what paged reads is fetched: the safetensors weights with
their config and tokenizer, or one GGUF file.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from paged.errors import UserError

logger = logging.getLogger(__name__)

# owner/name, as the Hub spells repository ids; a bare name is taken for a local path that is missing.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Beside the weights: configs (config, generation, tokenizer), the tokenizer's own files, chat templates.
_MODEL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_REMOTE_CODE = ["*.py"]  # a model's own config classes, for --trust-remote-code


@dataclass(frozen=True)
class HubModel:
    """A Hub repository, and for a GGUF repository the file wanted: its name, or a quantization tag (Q4_K_M)."""

    repo_id: str
    gguf: str | None = None

    def patterns(self, load_format: str, trust_remote_code: bool) -> list[str]:
        """The files to fetch; a GGUF carries its config and tokenizer, so nothing else is needed beside it."""
        if self.gguf is not None:
            if self.gguf.endswith(".gguf"):
                return [self.gguf]
            return [f"*{self.gguf.upper()}*.gguf", f"*{self.gguf.lower()}*.gguf"]
        weights = [] if load_format == "dummy" else ["*.safetensors"]
        return _MODEL_FILES + weights + (_REMOTE_CODE if trust_remote_code else [])


def hub_model(model: str, gguf_file: str | None = None) -> HubModel | None:
    """The repository `model` names (`owner/name`, or `owner/name:file.gguf`), or None for a local path."""
    if Path(model).expanduser().exists():
        return None
    repo_id, _, file = model.partition(":")
    if not _REPO_ID.fullmatch(repo_id):
        return None
    if file and gguf_file and file != gguf_file:
        raise UserError(f"two GGUF files named: {model} and --gguf-file {gguf_file}", param="gguf_file")
    return HubModel(repo_id, file or gguf_file or None)


def fetch(model: HubModel, *, revision: str | None = None, download_dir: str | None = None,
          load_format: str = "auto", trust_remote_code: bool = False) -> str:
    """The local path of the model, fetched into the Hub cache (or `download_dir`) where it is not there yet:
    the snapshot's folder, or its GGUF file. A missing repository, revision or file is one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    if load_format == "safetensors" and model.gguf is not None:
        raise UserError(f"--load-format safetensors, but {model.repo_id}:{model.gguf} names a GGUF file",
                        param="load_format")
    where = f"{model.repo_id}" + (f" at {revision}" if revision else "")
    logger.info("fetching %s from the Hugging Face Hub (or its cache%s)", where,
                f" in {download_dir}" if download_dir else "")
    patterns = model.patterns(load_format, trust_remote_code)
    try:
        folder = Path(snapshot_download(model.repo_id, revision=revision, cache_dir=download_dir,
                                        allow_patterns=patterns))
    except (OSError, ValueError, EntryNotFoundError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot fetch model {where} from the Hugging Face Hub: {reason}", param="model") from None
    if model.gguf is None:
        return str(folder)
    # The snapshot folder also holds whatever else was fetched of this commit before (other quantizations).
    found = sorted({p for p in folder.glob("*.gguf") if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)})
    if len(found) != 1:
        raise UserError(f"{model.repo_id}:{model.gguf}: expected one matching .gguf file, found "
                        f"{', '.join(p.name for p in found) or 'none'} (name one file; split GGUF files are not read)",
                        param="model")
    return str(found[0])
