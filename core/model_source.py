"""Where a model comes from (a Hugging Face folder or a GGUF file) and how to read each part of it.

Everything about the on-disk format stays here, so the engine asks for a config, a tokenizer, weights
and sampling defaults without knowing which format it got. Nothing is ever fetched from a model hub:
every transformers call is `local_files_only`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from paged.backends.common.cache import cache_dir
from paged.default_model import DEFAULT_MODEL_SAMPLING, default_model_path
from paged.errors import UserError
from paged.models.loader import LazyTensor, gguf_matrix_type, iter_gguf, iter_safetensors
from paged.quant.gguf import GGUFBlocks

logger = logging.getLogger(__name__)

# generation_config.json key -> our sampling parameter, as vLLM reads a model's sampling defaults.
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass
class ModelSource:
    """A resolved model: `path` is the folder or the .gguf file, `gguf_file` its file name when it is a GGUF."""

    path: str
    gguf_file: str | None
    hf_config: PretrainedConfig
    tokenizer: str | None = None  # a folder whose tokenizer replaces the model's own
    converted: Path | None = None  # a GGUF's config and tokenizer, saved once as a Hugging Face folder
    # Sampling defaults its authors recommend where the files carry none (the default model's card).
    recommended_sampling: dict[str, Any] | None = None

    @property
    def folder(self) -> Path:
        """The folder transformers is pointed at: the model folder, or the one holding the GGUF file."""
        path = Path(self.path)
        return path.parent if self.gguf_file else path

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer override if one was given, else the model's own (a GGUF carries one inside)."""
        if self.tokenizer is not None:
            return _from_pretrained(AutoTokenizer, "tokenizer", self.tokenizer, None)
        if self.converted is not None:
            return _from_pretrained(AutoTokenizer, "tokenizer", self.converted, None)
        return _from_pretrained(AutoTokenizer, "tokenizer", self.folder, self.gguf_file)

    def iter_weights(self, dtype: torch.dtype, keep_blocks: frozenset[str] = frozenset(),
                     wanted: Callable[[str], bool] = lambda name: True, lazy: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks | LazyTensor]]:
        """Every weight `wanted` (by its Hugging Face name; the others are not read) as (name, tensor); GGUF
        weights come dequantized to `dtype`, except matrices of a type in keep_blocks, which come as their
        quantized blocks. `lazy`: matrices come unread, for a rank that reads only its slices."""
        if not self.gguf_file:
            return iter_safetensors(self.path, wanted, lazy)
        return iter_gguf(self.path, dtype, keep_blocks, wanted, lazy)

    @property
    def generation_config_file(self) -> Path | None:
        file = self.folder / "generation_config.json"
        return file if not self.gguf_file and file.is_file() else None

    def generation_defaults(self) -> tuple[dict[str, Any], str]:
        """The sampling defaults the model's authors shipped, and where they come from: generation_config.json,
        else (a GGUF has none) what they recommend for it, if paged knows."""
        if self.generation_config_file is not None:
            config = json.loads(self.generation_config_file.read_text())
            found = {ours: config[key] for key, ours in _GENERATION_DEFAULTS.items() if config.get(key) is not None}
            return found, str(self.generation_config_file)
        if self.recommended_sampling:
            return dict(self.recommended_sampling), "the model card's recommendation"
        return {}, "none"

    def generation_eos_token_ids(self) -> list[int]:
        """End-of-sequence ids generation_config.json adds to the tokenizer's (Llama 3 lists several)."""
        if self.generation_config_file is None:
            return []
        found = json.loads(self.generation_config_file.read_text()).get("eos_token_id")
        return found if isinstance(found, list) else [found] if found is not None else []

    def stored_as(self) -> torch.dtype | str | None:
        """What the weights are stored in: the config's dtype, or for a GGUF the type of most of its matrices."""
        return gguf_matrix_type(self.path) if self.gguf_file else self.config_dtype()

    def config_dtype(self) -> torch.dtype | None:
        """The dtype the checkpoint was saved in, or None when unknown (a GGUF is quantized per tensor)."""
        if self.gguf_file:
            return None
        # transformers renamed `torch_dtype` to `dtype` in 4.56 and warns on the old name since.
        config = self.hf_config
        dtype = config.dtype if hasattr(config, "dtype") else config.torch_dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else None


def sampling_defaults(choice: str, source: ModelSource) -> dict[str, Any]:
    """vLLM's --generation-config: the model's own sampling defaults ('auto'), none ('vllm'), or those of
    another folder's generation_config.json; SamplingParams names, for fields a request leaves out."""
    if choice == "vllm":
        return {}
    if choice != "auto":
        folder = Path(choice).expanduser()
        if not (folder / "generation_config.json").is_file():
            raise UserError(f"--generation-config {choice}: no generation_config.json there", param="generation_config")
        source = ModelSource(str(folder), None, None)  # reads generation_config.json the one way
    defaults, where = source.generation_defaults()
    if defaults:
        logger.info("sampling defaults for fields a request leaves out, from %s: %s (--generation-config vllm "
                    "turns them off)", where, defaults)
    return defaults


def resolve_model(model: str | None, tokenizer: str | None = None) -> ModelSource:
    """Turn what the user named into a ModelSource: None (the default model), a folder with config.json, or a .gguf.

    Anything else, or a file transformers cannot read, is a one-line UserError naming the path.
    """
    default = model is None
    if default:
        model = default_model_path()
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        source = ModelSource(str(path), None, _from_pretrained(AutoConfig, "config", path, None))
    elif path.is_file() and path.suffix == ".gguf":
        converted = _converted_gguf(path)
        config = _from_pretrained(AutoConfig, "config", converted, None)
        source = ModelSource(str(path), path.name, config, converted=converted)
    else:
        raise UserError(f"model '{model}' not found: expected a folder with config.json or a .gguf file", "model")
    if tokenizer is not None:
        tokenizer_path = Path(tokenizer).expanduser()
        if not tokenizer_path.is_dir():
            raise UserError(f"tokenizer '{tokenizer}' not found: expected a folder with tokenizer files", "tokenizer")
        source.tokenizer = str(tokenizer_path)
    if default:
        source.recommended_sampling = DEFAULT_MODEL_SAMPLING
    return source


def _converted_gguf(path: Path) -> Path:
    """A Hugging Face folder with the GGUF's config and tokenizer, converted on first use and kept.

    transformers parses the whole GGUF metadata (the vocabulary included) to build either, which takes
    seconds; the saved folder loads in a fraction of that. Keyed by size and modification time, so a
    changed file is converted again.
    """
    stat = path.stat()
    folder = cache_dir() / "converted" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "config.json").is_file():
        return folder
    logger.info("reading the config and tokenizer of %s once, into %s (the next start skips this)", path.name, folder)
    config = _with_architectures(_from_pretrained(AutoConfig, "config", path.parent, path.name))
    tokenizer = _from_pretrained(AutoTokenizer, "tokenizer", path.parent, path.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _with_architectures(config: PretrainedConfig) -> PretrainedConfig:
    """Name the causal-LM class a GGUF config leaves out, so model lookup by `architectures` works for both formats."""
    if not config.architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def _from_pretrained(auto_class: Any, what: str, folder: str | Path, gguf_file: str | None) -> Any:
    """`auto_class.from_pretrained` on local files only, its failures turned into one-line UserErrors."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return auto_class.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for unreadable files
        where = Path(folder) / gguf_file if gguf_file else folder
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the {what} from '{where}': {reason}") from error
