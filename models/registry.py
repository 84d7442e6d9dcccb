"""Architectures by the name a checkpoint's config lists under `architectures`."""

from __future__ import annotations

from torch import nn

from paged.models import llama

ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (llama.LlamaForCausalLM, llama.MistralForCausalLM, llama.Qwen2ForCausalLM, llama.Qwen3ForCausalLM,
                llama.Phi3ForCausalLM, llama.MixtralForCausalLM, llama.Qwen2MoeForCausalLM,
                llama.Qwen3MoeForCausalLM, llama.Gemma2ForCausalLM, llama.Gemma3ForCausalLM,
                llama.ApertusForCausalLM)
}


def model_class(hf_config) -> type[nn.Module]:
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"architecture {names or '(none)'} is not supported; supported: {', '.join(ARCHITECTURES)}")
