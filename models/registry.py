"""Architectures by the name a checkpoint's config lists under `architectures`."""

from __future__ import annotations

from torch import nn

from paged.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(hf_config) -> type[nn.Module]:
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"architecture {names or '(none)'} is not supported; supported: {', '.join(ARCHITECTURES)}")
