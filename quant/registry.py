"""Which quantization method a model runs with: its checkpoint's, or the one `--quantization` names."""

from __future__ import annotations

from typing import Any

from paged.errors import UserError
from paged.quant.awq import AWQ
from paged.quant.base import QuantMethod
from paged.quant.compressed_tensors import CompressedTensors
from paged.quant.fp8 import FP8
from paged.quant.gptq import GPTQ

METHODS: dict[str, type[QuantMethod]] = {m.name: m for m in (FP8, AWQ, GPTQ, CompressedTensors)}
# GGUF files are read by their own path (models/loader.py): their matrices are quantized per tensor.
NAMES = (*METHODS, "gguf")


def checkpoint_quantization(hf_config: Any) -> dict[str, Any] | None:
    """The config.json's quantization_config as a dict (transformers may have made it an object)."""
    found = getattr(hf_config, "quantization_config", None)
    if found is None or isinstance(found, dict):
        return found
    return found.to_dict()


def resolve_quantization(hf_config: Any, requested: str | None, is_gguf: bool, model: str) -> QuantMethod | None:
    """The method, or None for a dense checkpoint (or a GGUF file) run as it is; a UserError when the two
    disagree or the config is one paged cannot run."""
    if requested is not None and requested not in NAMES:
        raise UserError(f"--quantization {requested}: unknown method (known: {', '.join(NAMES)})",
                        param="quantization")
    if is_gguf:
        if requested not in (None, "gguf"):
            raise UserError(f"--quantization {requested} does not apply to the GGUF file {model}", param="quantization")
        return None
    if requested == "gguf":
        raise UserError(f"--quantization gguf needs a .gguf file; {model} is not one", param="quantization")
    config = checkpoint_quantization(hf_config)
    found = config.get("quant_method") if config else None
    if found is not None and requested is not None and found != requested:
        raise UserError(f"--quantization {requested} does not match the checkpoint's quantization method ({found})",
                        param="quantization")
    name = found or requested
    if name is None:
        return None
    if name not in METHODS:
        raise UserError(f"{model} is quantized with {name!r}, which paged does not run (it runs: "
                        f"{', '.join(METHODS)})", param="quantization")
    if config is None and not METHODS[name].on_the_fly:
        raise UserError(f"--quantization {name} needs a checkpoint quantized with {name}; {model} has no "
                        "quantization_config", param="quantization")
    try:
        return METHODS[name].from_config(config)
    except (ValueError, KeyError) as e:
        raise UserError(f"{model}: {e}", param="quantization") from None
