"""Engine configuration: one pydantic model, validated once at start-up."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from paged.errors import UserError
from paged.spec_decode.config import SpeculativeConfig, parse_speculative_config

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(value: int | float | str) -> int:
    """Accept 4294967296, 4e9 or '4GiB' / '512MiB' / '4G'."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {value!r} (examples: 4GiB, 512MiB, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class EngineConfig(BaseModel):
    """Everything the engine needs to start; names follow vLLM's engine arguments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct); a path or a Hub id
    tokenizer: str | None = None
    revision: str | None = None  # the Hub model's branch, tag or commit; None: main
    download_dir: str | None = None  # a Hub cache of its own; None: huggingface_hub's (HF_HOME, HF_HUB_CACHE)
    gguf_file: str | None = None  # the GGUF file of a Hub repository or local folder holding several
    trust_remote_code: bool = False  # let transformers run a model's own config and tokenizer code
    served_model_name: str | None = None
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device: str | None = None  # None: detect
    seed: int = 0
    max_model_len: int | None = Field(default=None, gt=0)
    block_size: int = Field(default=16, gt=0)
    enable_prefix_caching: bool = True
    kv_cache_memory: int = 4 << 30  # bytes, for backends whose KV cache lives in host memory
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    num_gpu_blocks_override: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)  # None: the backend sizes a step
    max_logprobs: int = Field(default=20, ge=0)
    enforce_eager: bool = False
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    # How ranks beyond the engine core's own run: "mp" worker processes on this machine, "ray" actors over a
    # Ray cluster's nodes; None: mp where this machine has the devices, else ray.
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    chat_template: str | None = None
    generation_config: str = "auto"  # "auto": sampling defaults from the model; "vllm": none
    # auto: GGUF for a .gguf file, else safetensors; dummy: random weights, for benchmarks of a shape.
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    quantization: str | None = None  # None: the checkpoint's own; "fp8" quantizes a dense one at load
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8 (fp8_e4m3): e4m3 with per-layer scales
    skip_tokenizer_init: bool = False  # token ids in, token ids out
    # Which library compiles JSON schemas, regexes and grammars; "auto": xgrammar, llguidance for what it refuses.
    structured_outputs_backend: Literal["auto", "xgrammar", "guidance"] = "auto"
    # JSON outputs are compact (", " and ": ") unless this is set: with free whitespace a small model can
    # spend its whole budget on newlines inside an object, which still matches the schema.
    structured_outputs_any_whitespace: bool = False
    # Draft tokens checked by the model in one pass (vLLM's --speculative-config, a JSON object or a dict).
    speculative_config: SpeculativeConfig | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """The config, or a UserError naming the first bad argument (a one-line message at the CLI)."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError
            raise UserError(f"invalid engine argument {where}: {message}", param=where) from None

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _bytes(cls, value: int | float | str) -> int:
        return parse_bytes(value)

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _speculative(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        return parse_speculative_config(value)

    @field_validator("kv_cache_dtype")
    @classmethod
    def _kv_cache_dtype(cls, value: str) -> str:
        value = {"fp8_e4m3": "fp8"}.get(value, value)
        if value not in ("auto", "fp8"):
            raise ValueError("kv_cache_dtype must be auto or fp8 (fp8_e4m3)")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        aliases = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}
        value = aliases.get(value, value)
        if value not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("dtype must be one of auto, float32, bfloat16, float16")
        return value
