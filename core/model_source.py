"""Where a model comes from (a Hugging Face folder or a GGUF file) and how to read each part of it.

Everything about the on-disk format stays here, so the engine asks for a config, a tokenizer, weights
and sampling defaults without knowing which format it got. A model named by Hub id is fetched first
(paged.hub) and read from there like any folder: every transformers call is `local_files_only`.
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
from paged.config import EngineConfig
from paged.default_model import DEFAULT_MODEL_SAMPLING, default_model_path
from paged.errors import UserError
from paged.hub import HubModel, fetch, hub_model
from paged.models.loader import LazyTensor, gguf_gemma_facts, gguf_matrix_type, iter_gguf, iter_safetensors
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
    trust_remote_code: bool = False  # the model's own config and tokenizer classes may run

    @property
    def folder(self) -> Path:
        """The folder transformers is pointed at: the model folder, or the one holding the GGUF file."""
        path = Path(self.path)
        return path.parent if self.gguf_file else path

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer override if one was given, else the model's own (a GGUF carries one inside)."""
        trust = self.trust_remote_code
        if self.tokenizer is not None:
            return _from_pretrained(AutoTokenizer, "tokenizer", self.tokenizer, None, trust)
        if self.converted is not None:
            return _from_pretrained(AutoTokenizer, "tokenizer", self.converted, None, trust)
        return _from_pretrained(AutoTokenizer, "tokenizer", self.folder, self.gguf_file, trust)

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


def source_of(config: EngineConfig) -> ModelSource:
    """The engine config's model (and tokenizer), fetched from the Hub first where they are named by Hub id."""
    local = localized(config)
    return resolve_model(local.model, local.tokenizer, load_format=config.load_format,
                         trust_remote_code=config.trust_remote_code)


def localized(config: EngineConfig) -> EngineConfig:
    """The config with a model or tokenizer named by Hub id replaced by its local path, fetched where missing:
    done once before a server's processes start, so that they all read the same files and none downloads."""
    update: dict[str, Any] = {}
    model = config.model and hub_model(config.model, config.gguf_file)
    if model:
        update["model"] = fetch(model, revision=config.revision, download_dir=config.download_dir,
                                load_format=config.load_format, trust_remote_code=config.trust_remote_code)
    elif config.gguf_file and config.model:
        update["model"] = str(Path(config.model).expanduser() / config.gguf_file)
    if model or config.gguf_file:
        update["gguf_file"] = None  # now part of the path
    spec = config.speculative_config
    draft = spec and spec.model and hub_model(spec.model)
    if draft:
        update["speculative_config"] = spec.model_copy(update={"model": fetch(
            draft, download_dir=config.download_dir, load_format=config.load_format,
            trust_remote_code=config.trust_remote_code)})
    tokenizer = config.tokenizer and hub_model(config.tokenizer)
    if tokenizer:
        update["tokenizer"] = fetch(HubModel(tokenizer.repo_id), download_dir=config.download_dir, load_format="dummy",
                                    trust_remote_code=config.trust_remote_code)
    return config.model_copy(update=update)


def resolve_model(model: str | None, tokenizer: str | None = None, *, load_format: str = "auto",
                  trust_remote_code: bool = False) -> ModelSource:
    """Turn a local model into a ModelSource: None (the default model), a folder with config.json, a .gguf file,
    or with load_format "gguf" a folder holding one.

    Anything else, or a file transformers cannot read, is a one-line UserError naming the path.
    """
    default = model is None
    if default:
        model = default_model_path()
    path = Path(model).expanduser()
    if path.is_dir() and load_format == "gguf":
        path = _only_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        config = _from_pretrained(AutoConfig, "config", path, None, trust_remote_code)
        source = ModelSource(str(path), None, config, trust_remote_code=trust_remote_code)
    elif path.is_file() and path.suffix == ".gguf":
        if load_format == "safetensors":
            raise UserError(f"--load-format safetensors, but '{model}' is a GGUF file", param="load_format")
        converted = _converted_gguf(path)
        config = _from_pretrained(AutoConfig, "config", converted, None)
        source = ModelSource(str(path), path.name, config, converted=converted)
    else:
        raise UserError(f"model '{model}' not found: expected a folder with config.json, a .gguf file, or a "
                        "Hugging Face Hub id (owner/name, or owner/name:file.gguf)", "model")
    if tokenizer is not None:
        tokenizer_path = Path(tokenizer).expanduser()
        if not tokenizer_path.is_dir():
            raise UserError(f"tokenizer '{tokenizer}' not found: expected a folder with tokenizer files", "tokenizer")
        source.tokenizer = str(tokenizer_path)
    if default:
        source.recommended_sampling = DEFAULT_MODEL_SAMPLING
    return source


def _only_gguf(folder: Path) -> Path:
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise UserError(f"--load-format gguf: '{folder}' holds {len(found)} .gguf files "
                        f"({', '.join(p.name for p in found) or 'none'}); name one with --gguf-file", "load_format")
    return found[0]


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
    config = _with_gemma_facts(_with_architectures(_from_pretrained(AutoConfig, "config", path.parent, path.name)),
                               path)
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


def _with_gemma_facts(config: PretrainedConfig, path: Path) -> PretrainedConfig:
    """Fill in what transformers' GGUF reader leaves at the defaults of a Gemma config (models.loader says which)."""
    facts = gguf_gemma_facts(path)
    factor = facts.pop("global_rope_factor", None)
    for key, value in facts.items():
        setattr(config, key, value)
    if factor is not None and "full_attention" in (config.rope_parameters or {}):
        config.rope_parameters = {**config.rope_parameters, "full_attention": {
            **config.rope_parameters["full_attention"], "rope_type": "linear", "factor": factor}}
    return config


def _from_pretrained(auto_class: Any, what: str, folder: str | Path, gguf_file: str | None,
                     trust_remote_code: bool = False) -> Any:
    """`auto_class.from_pretrained` on local files only, its failures turned into one-line UserErrors."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return auto_class.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code,
                                          **kwargs)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for unreadable files
        where = Path(folder) / gguf_file if gguf_file else folder
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the {what} from '{where}': {reason}") from error
