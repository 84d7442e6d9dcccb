"""Engine flags shared by every subcommand that starts an engine, named as vLLM names them."""

from __future__ import annotations

import argparse
from typing import Any

from paged.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="a Hugging Face Hub id (owner/name, or owner/name:file.gguf for one GGUF "
                       "file of a repository), an HF folder or a .gguf file (default: SmolLM2-135M-Instruct)")
    group.add_argument("--tokenizer", help="tokenizer folder or Hub id, if not the model's")
    group.add_argument("--revision", help="the Hub model's branch, tag or commit (default: main)")
    group.add_argument("--download-dir", help="Hub cache folder to fetch into and read from (default: "
                       "huggingface_hub's, under $HF_HOME or $HF_HUB_CACHE)")
    group.add_argument("--gguf-file", help="the .gguf file to load from a Hub repository or folder holding several")
    group.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                       help="auto: GGUF for a .gguf file, else safetensors; dummy: random weights of the model's shape")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run a model's own config and tokenizer code (the architecture must "
                            "still be one paged implements)")
    group.add_argument("--device", help="backend name (cpu, cuda, rocm, tpu, gaudi, or a plugin); default: detect")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "half", "bf16"])
    group.add_argument("--max-model-len", type=int)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--kv-cache-memory", default=str(EngineConfig.model_fields["kv_cache_memory"].default),
                       help="KV cache size for host-memory backends, e.g. 4GiB")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int,
                       help="tokens one step computes (default: 8192 on accelerators; on a CPU, about a second's work)")
    group.add_argument("--max-logprobs", type=int, default=20)
    group.add_argument("--enforce-eager", action="store_true", help="never replay captured graphs")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                       help="pipeline stages the layers are cut into (each of tensor-parallel-size ranks)")
    group.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                       help="where ranks beyond the first run: mp (processes on this machine) or ray (actors on a "
                            "Ray cluster, RAY_ADDRESS or a local one); default: mp where this machine has the devices")
    group.add_argument("--chat-template", help="a Jinja chat template, or a file holding one")
    group.add_argument("--quantization", "-q", help="quantization method (fp8, awq, gptq, compressed-tensors, "
                       "gguf); default: the checkpoint's own; fp8 quantizes a dense checkpoint at load")
    group.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                       help="auto: the model's dtype; fp8: e4m3 with per-layer scales (about twice the blocks)")
    group.add_argument("--structured-outputs-backend", "--guided-decoding-backend", default="auto",
                       choices=["auto", "xgrammar", "guidance"],
                       help="grammar library for response_format, structured_outputs and tool calls (default: "
                            "xgrammar, llguidance for what xgrammar cannot compile)")
    group.add_argument("--structured-outputs-any-whitespace", action="store_true",
                       help="let JSON outputs put any whitespace between tokens (default: compact JSON)")
    group.add_argument("--speculative-config", help="speculative decoding as JSON, e.g. "
                       '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\' '
                       "(ngram: prompt lookup; optional prompt_lookup_min, disable_by_batch_size)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = [
        "model", "tokenizer", "revision", "download_dir", "gguf_file", "load_format", "trust_remote_code", "device",
        "dtype", "max_model_len", "seed", "block_size", "enable_prefix_caching",
        "kv_cache_memory", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "max_logprobs",
        "enforce_eager", "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
        "chat_template", "quantization", "kv_cache_dtype",
        "structured_outputs_backend", "structured_outputs_any_whitespace", "speculative_config",
    ]
    return {name: getattr(args, name) for name in names}
