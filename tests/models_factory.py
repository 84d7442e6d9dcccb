"""Tiny random checkpoints of each supported architecture, saved as Hugging Face folders with a tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    ApertusConfig,
    ApertusForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 512
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             # Large weights make attention sharp, so a wrong context changes the tokens (see
             # tests/test_models_e2e.py::test_broken_attention_is_caught).
             initializer_range=0.25)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama3-scaled": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), rope_theta=500000.0)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, num_key_value_heads=1)),
    # Every layer slides over 24 tokens, shorter than most prompts: blocks that leave the window are freed.
    "mistral-sliding": (MistralConfig, MistralForCausalLM, dict(sliding_window=24)),
    # Gemma: sliding windows shorter than the longer prompts, alternating with global layers. Gemma 2's
    # attention soft cap is made small and its scores sharp, so that both change the tokens at this scale.
    # Untied: with tied embeddings scaled by sqrt(hidden), a tiny model predicts from its input token alone
    # and attention would hardly change the tokens.
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=16, tie_word_embeddings=False, query_pre_attn_scalar=4, sliding_window=6,
                                                     attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        head_dim=32, tie_word_embeddings=False, query_pre_attn_scalar=8, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "apertus": (ApertusConfig, ApertusForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, use_sliding_window=False)),
    # head_dim beside hidden_size / heads, as Qwen3's own shapes have it
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=True, use_sliding_window=False)),
    # Fused qkv and gate_up in the checkpoint. LongRoPE with distinct short and long factors, trained on 128
    # positions (prompts and outputs stay within them: see layers.rope_angles), and Phi-4-mini's partial rotary.
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(pad_token_id=0, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
        short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[2.0 + 0.5 * i for i in range(6)]),
        original_max_position_embeddings=128)),
    # Mixture of experts: with 8 or 16 experts and top-2 routing, a decode step of a few sequences leaves most
    # experts without tokens. Qwen3-MoE's middle layer is dense (mlp_only_layers); Qwen2-MoE adds a shared expert.
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=8, num_experts_per_tok=2,
                                                        sliding_window=None)),
    "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(num_experts=16, num_experts_per_tok=2,
                                                            moe_intermediate_size=48, mlp_only_layers=[1],
                                                            norm_topk_prob=False, use_sliding_window=False)),
    "qwen2-moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(num_experts=8, num_experts_per_tok=2,
                                                            moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                                            norm_topk_prob=True, use_sliding_window=False)),
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0".."w{VOCAB-1}" so prompts and outputs round-trip as text."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def save_tiny_model(arch: str, folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """`overrides`: config fields to change (a vocabulary larger than the tokenizer's, say)."""
    config_cls, model_cls, extra = ARCHS[arch]
    # Eager attention: the one every transformers version computes soft caps in (Gemma 2's are dropped by
    # sdpa, the default of some versions).
    config = config_cls(**{**SHAPE, **extra, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model


def split_workload(arch: str, folder: Path, num_prompts: int = 12) -> tuple[dict, list[dict], list]:
    """A tiny random model of `arch` saved in `folder`, and a greedy batch for comparing split layouts with one
    rank: (engine kwargs, prompts, sampling params). 20 blocks of 16 tokens for requests of up to 110 tokens:
    they cannot all run at once, so some are preempted. Qwen2's vocabulary is made odd (beyond the tokenizer's
    words), so two ranks' vocabulary slices differ in size."""
    from paged import SamplingParams

    overrides = {"vocab_size": VOCAB + 1} if arch == "qwen2" else {}
    save_tiny_model(arch, folder, seed=random.randrange(1 << 30), **overrides)
    prompts = [{"prompt_token_ids": [random.randrange(3, VOCAB) for _ in range(random.randint(3, 70))]}
               for _ in range(num_prompts)]
    params = [SamplingParams(temperature=0, max_tokens=random.randint(8, 40), ignore_eos=True) for _ in prompts]
    kwargs = dict(model=str(folder), dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=48,
                  num_gpu_blocks_override=20)
    return kwargs, prompts, params
