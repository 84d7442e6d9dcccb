"""The Llama family: Llama 2/3.x, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3, Phi-3/4, Gemma 2/3, Apertus,
and the mixture-of-experts members Mixtral, Qwen2-MoE and Qwen3-MoE.

They differ only in facts the config carries (grouped-query heads, tied embeddings, q/k/v bias, rope
scaling, sliding windows, soft caps, the activation) and a few class facts (per-head q/k norms, Gemma's
norms around both blocks, fused checkpoint projections, which layers route to experts), so one module
serves them all.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from paged.backends.interface import Attention, AttentionMetadata, Communicator
from paged.parallel import ParallelLayout
from paged.models.loader import GGUFTensor, LazyTensor, whole
from paged.models.moe import FusedExperts, SparseMoeBlock
from paged.quant.gguf import GGUFBlocks
from paged.models.layers import (
    BlockLoading,
    GemmaRMSNorm,
    layer_windows,
    XIELU,
    HeldElsewhere,
    LinearBase,
    ColumnParallelLinear,
    kv_head_splits,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightLoading,
)


def rope_parameters(config) -> dict:
    """Rope settings from either transformers 5's rope_parameters or the older rope_theta + rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    for name in ("partial_rotary_factor", "original_max_position_embeddings", "max_position_embeddings"):
        if getattr(config, name, None) is not None:
            params.setdefault(name, getattr(config, name))
    return params


def layer_rope_parameters(config) -> list[dict]:
    """Each layer's rope settings: one set for all, or (Gemma 3) one per layer kind, keyed by it."""
    params = rope_parameters(config)
    kinds = getattr(config, "layer_types", None) or []
    if kinds and all(isinstance(params.get(kind), dict) for kind in set(kinds)):
        shared = {k: v for k, v in params.items() if not isinstance(v, dict)}
        return [{**shared, **params[kind]} for kind in kinds]
    return [params] * config.num_hidden_layers


# config activation name -> the gated op computing act(gate) * up
_GATED_ACTIVATIONS = {"silu": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul"}


def activation_name(config) -> str:
    """Gemma names its activation hidden_activation, the others hidden_act."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")


class LlamaAttention(nn.Module):
    def __init__(self, config, comm: Communicator, attention: Attention, ops: dict, rotary: RotaryEmbedding,
                 qkv_bias: bool, qk_norm: type[RMSNorm] | None, window: int | None):
        """`qk_norm`: the norm over each head of q and k before the rotation (Qwen3, Gemma 3, Apertus);
        `window`: this layer's sliding window."""
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_splits = kv_head_splits(heads, kv_heads, comm.world_size)
        self.num_heads, self.num_kv_heads = heads // comm.world_size, kv_heads // kv_splits
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Gemma scales by query_pre_attn_scalar, which is not always head_dim.
        self.scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.window, self.softcap = window, getattr(config, "attn_logit_softcapping", None)
        d = self.head_dim
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [heads * d, kv_heads * d, kv_heads * d], qkv_bias,
                                             comm, ops, [comm.world_size, kv_splits, kv_splits])
        self.o_proj = RowParallelLinear(heads * d, config.hidden_size, getattr(config, "attention_bias", False), comm,
                                        ops)
        self.q_norm = qk_norm(self.head_dim, config.rms_norm_eps, ops) if qk_norm else None
        self.k_norm = qk_norm(self.head_dim, config.rms_norm_eps, ops) if qk_norm else None
        self.rotary = rotary  # one table shared by every layer
        self.attn = attention
        # (K, V) scales of an fp8 KV cache: the checkpoint's where it has them, else 1.
        self.register_buffer("kv_scale", torch.ones(2, dtype=torch.float32), persistent=False)

    def forward(self, positions, hidden, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        tokens = hidden.shape[0]
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(tokens, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(tokens, self.kv_size)
        q, k = self.rotary(positions, q, k)
        out = self.attn.forward(
            q.reshape(tokens, self.num_heads, self.head_dim),
            k.reshape(tokens, self.num_kv_heads, self.head_dim),
            v.reshape(tokens, self.num_kv_heads, self.head_dim),
            kv_cache,
            meta,
            self.scale,
            self.kv_scale,
            window=self.window,
            softcap=self.softcap,
        )
        return self.o_proj(out.reshape(tokens, self.q_size))


class LlamaMLP(nn.Module):
    """The gated feed-forward block: act(gate) * up, then down (SwiGLU, or Gemma's GeGLU)."""

    def __init__(self, config, comm: Communicator, ops: dict, intermediate: int | None = None):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        inter = intermediate or config.intermediate_size
        act = activation_name(config)
        if act not in _GATED_ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported (these are: {', '.join(_GATED_ACTIVATIONS)})")
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter], bias, comm, ops)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, comm, ops)
        self._act = ops[_GATED_ACTIVATIONS[act]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward blocks. With `family.sandwich_norms` (Gemma 2/3) each block's
    output is normed again before the residual add: post_attention_layernorm is then that norm of the
    attention's output, and pre_feedforward_layernorm the feed-forward block's input norm."""

    def __init__(self, config, comm, attention, ops, rotary, family: LlamaForCausalLM, index: int,
                 window: int | None):
        super().__init__()
        qkv_bias = family.qkv_bias or getattr(config, "attention_bias", False)
        norm, hidden = family.norm, config.hidden_size
        self.self_attn = LlamaAttention(config, comm, attention, ops, rotary, qkv_bias,
                                        family.norm if family.qk_norm else None, window)
        self.mlp = family.make_mlp(config, comm, ops, index)
        self.input_layernorm = norm(hidden, config.rms_norm_eps, ops)
        self.post_attention_layernorm = norm(hidden, config.rms_norm_eps, ops)
        self.sandwich = family.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(hidden, config.rms_norm_eps, ops)
            self.post_feedforward_layernorm = norm(hidden, config.rms_norm_eps, ops)

    def forward(self, positions, hidden, residual, kv_cache, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        if not self.sandwich:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class LlamaModel(nn.Module):
    """This pipeline stage's layers (all of them with one stage): the first stage embeds, the last normalises;
    between stages the hidden state and the residual travel stacked in one tensor."""

    def __init__(self, config, comm, attention, ops, max_positions, family: LlamaForCausalLM,
                 layout: ParallelLayout):
        super().__init__()
        self.layout = layout
        self.stage_layers = layout.stage_layers(config.num_hidden_layers)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, comm) \
            if layout.is_first_stage else HeldElsewhere()
        # Gemma multiplies the embeddings by sqrt(hidden), rounded to the model's dtype (the default one while
        # the model is built) as it does.
        self.embed_scale = torch.tensor(config.hidden_size**0.5).to(torch.get_default_dtype()).item() \
            if family.sandwich_norms else None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotaries: dict[str, RotaryEmbedding] = {}  # one table per distinct rope setting, shared by its layers
        windows = layer_windows(config, max_positions)
        layers = []
        for i, rope in enumerate(layer_rope_parameters(config)):
            if i not in self.stage_layers:
                layers.append(HeldElsewhere())
                continue
            rotary = rotaries.setdefault(repr(sorted(rope.items())), RotaryEmbedding(head_dim, max_positions, rope, ops))
            layers.append(LlamaDecoderLayer(config, comm, attention, ops, rotary, family, i, windows[i]))
        self.layers = nn.ModuleList(layers)
        self.norm = family.norm(config.hidden_size, config.rms_norm_eps, ops) if layout.is_last_stage \
            else HeldElsewhere()

    def forward(self, input_ids, positions, kv_caches, meta, carried: torch.Tensor | None = None) -> torch.Tensor:
        """`carried`: the previous stage's output. Returns the final hidden states on the last stage, else
        what the next stage takes."""
        if carried is None:
            hidden, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:
                hidden = hidden * self.embed_scale
        else:
            hidden, residual = carried.unbind(0)
        for layer, kv_cache in zip(self.layers[self.stage_layers.start : self.stage_layers.stop], kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        if not self.layout.is_last_stage:
            return torch.stack((hidden, residual))
        hidden, _ = self.norm(hidden, residual)
        return hidden


# A checkpoint's expert matrix: "<layer>.experts.<index>.<projection>.weight".
_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(\w+)\.weight$")


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    norm: type[RMSNorm] = RMSNorm
    sandwich_norms = False  # Gemma's norms after each block too, and its scaled embeddings
    # checkpoint name fragment -> ours, where a checkpoint names a module otherwise
    renamed: dict[str, str] = {}
    # checkpoint name fragment -> (our packed parameter fragment, shard index)
    packed = {
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    # checkpoint name ending -> which of a layer's KV cache scales it is (fp8 and compressed-tensors spellings)
    kv_scales = {
        ".self_attn.k_scale": 0,
        ".self_attn.v_scale": 1,
        ".self_attn.k_proj.output_scale": 0,
        ".self_attn.v_proj.output_scale": 1,
    }

    def __init__(self, config, comm: Communicator, attention: Attention, ops: dict, max_positions: int,
                 layout: ParallelLayout | None = None):
        """`layout`: which pipeline stage this is (the LM head sits with the embedding, on stage 0)."""
        super().__init__()
        layout = layout or ParallelLayout()
        self.config = config
        self.attention = attention
        self.model = LlamaModel(config, comm, attention, ops, max_positions, self, layout)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, comm, ops) \
            if layout.is_first_stage else HeldElsewhere()
        if self.tied and layout.is_first_stage:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.lm_head.owns_weight = False
        # Checkpoint name prefixes of what other pipeline stages hold.
        self._elsewhere = tuple(f"{name}." for name, m in self.named_modules() if isinstance(m, HeldElsewhere))

    def make_mlp(self, config, comm: Communicator, ops: dict, index: int) -> nn.Module:
        """Layer `index`'s feed-forward block: a dense MLP here, experts in the mixture-of-experts members."""
        return LlamaMLP(config, comm, ops)

    def forward(self, input_ids, positions, kv_caches, meta, carried: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, carried)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.logits(hidden).float()
        if self.final_softcap is not None:  # Gemma 2's soft cap on the logits
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | GGUFBlocks | LazyTensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into this rank's parameters; returns names loaded.

        GGUF matrices may come as their quantized blocks: a layer whose method computes from them keeps
        them, anything else gets them dequantized."""
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tied and name == "lm_head.weight"):
                continue
            if not self.holds(name):
                continue
            if self._load_kv_scale(name, tensor, modules):
                continue
            for fragment, ours in self.renamed.items():
                name = name.replace(fragment, ours)
            expert = _EXPERT.match(name)
            if expert and isinstance(modules.get(expert[1]), FusedExperts):
                experts = modules[expert[1]]
                if isinstance(tensor, GGUFBlocks):
                    tensor = tensor.dequantize(experts.w13_weight.dtype)
                loaded.add(f"{expert[1]}.{experts.load_expert(int(expert[2]), expert[3], tensor)}")
                continue
            target, shard = name, None
            for fragment, (packed, index) in self.packed.items():
                if fragment in name:
                    target, shard = name.replace(fragment, packed), index
                    break
            module_name, suffix = target.rsplit(".", 1)
            module = modules.get(module_name)
            if isinstance(module, LinearBase) and module.method.takes_part(suffix):
                module.method.keep_part(module, suffix, whole(tensor), shard)
                loaded.add(target)
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            # The parts a linear layer packs, fused in the checkpoint already (Phi-3's qkv_proj and gate_up_proj).
            fused = isinstance(module, LinearBase) and shard is None and module.num_parts > 1
            if isinstance(tensor, (GGUFBlocks, GGUFTensor)):
                if self.tied and module is self.model.embed_tokens and self.lm_head.takes_blocks(tensor):
                    self.lm_head.load_blocks(tensor, None)  # logits from the blocks; lookups from dense rows
                if isinstance(module, BlockLoading) and module.takes_blocks(tensor) and not fused:
                    module.load_blocks(tensor, shard)
                    loaded.add(target)
                    continue
                if isinstance(tensor, GGUFBlocks):
                    tensor = tensor.dequantize(param.dtype)
            if fused:
                for part, piece in enumerate(whole(tensor).split(module.out_sizes)):
                    module.load_shard(param, piece, part)
            elif isinstance(module, WeightLoading):
                module.load_shard(param, tensor, shard)  # reads only its slice of a lazy tensor
            else:
                param.data.copy_(whole(tensor))
            loaded.add(target)
        missing = {n for n in params if n not in loaded} - ({"lm_head.weight"} if self.tied else set())
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        self.process_weights()
        return loaded

    def holds(self, name: str) -> bool:
        """Whether this rank has a place for the checkpoint tensor: not in a module another pipeline stage
        holds (so the loader need not even read it)."""
        return not name.startswith(self._elsewhere)

    def _load_kv_scale(self, name: str, tensor: torch.Tensor, modules: dict[str, nn.Module]) -> bool:
        for ending, index in self.kv_scales.items():
            if name.endswith(ending):
                modules[name.removesuffix(ending) + ".self_attn"].kv_scale[index] = whole(tensor).float().reshape(())
                return True
        return False

    def process_weights(self) -> None:
        """Let the backend repack every linear layer's weights, once they are all in place."""
        for module in self.modules():
            if module is not self and hasattr(module, "process_weights"):
                module.process_weights()


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 and Phi-4: the checkpoint stores qkv_proj and gate_up_proj fused, as this module packs them;
    LongRoPE and partial rotary come from the config."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class MixtralForCausalLM(LlamaForCausalLM):
    """Every layer routes each token to its top-k of num_local_experts, their weights renormalised to sum to 1."""

    renamed = {".block_sparse_moe.": ".mlp."}

    def make_mlp(self, config, comm: Communicator, ops: dict, index: int) -> nn.Module:
        return SparseMoeBlock(config, comm, ops, config.num_local_experts, config.intermediate_size,
                              renormalize=True)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Layers route to experts except those in mlp_only_layers and those decoder_sparse_step skips; the top-k
    weights are renormalised only with norm_topk_prob."""

    def make_mlp(self, config, comm: Communicator, ops: dict, index: int) -> nn.Module:
        sparse = config.num_experts > 0 and (index + 1) % config.decoder_sparse_step == 0
        if index in config.mlp_only_layers or not sparse:
            return LlamaMLP(config, comm, ops)
        return SparseMoeBlock(config, comm, ops, config.num_experts, config.moe_intermediate_size,
                              renormalize=config.norm_topk_prob, shared_expert=self.shared_expert(config, comm, ops))

    def shared_expert(self, config, comm: Communicator, ops: dict) -> nn.Module | None:
        return None


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE's routing with Qwen2's q/k/v bias and no q/k norms, plus an always-on shared expert."""

    qkv_bias = True
    qk_norm = False

    def shared_expert(self, config, comm: Communicator, ops: dict) -> nn.Module | None:
        return LlamaMLP(config, comm, ops, config.shared_expert_intermediate_size)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2: GeGLU, norms before and after each block with (1 + weight) scaling, scaled embeddings, soft
    caps on attention scores and on the logits, sliding-window and global layers alternating."""

    norm = GemmaRMSNorm
    sandwich_norms = True


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: Gemma 2's layout with q/k norms instead of the attention soft cap, five sliding layers
    to one global, and a rope base (and scaling) of its own for each kind of layer."""

    qk_norm = True


class ApertusMLP(nn.Module):
    """Apertus' feed-forward block: no gate, up, xIELU, down."""

    def __init__(self, config, comm: Communicator, ops: dict):
        super().__init__()
        if config.hidden_act != "xielu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported for Apertus (xielu is)")
        self.up_proj = ColumnParallelLinear(config.hidden_size, [config.intermediate_size], False, comm, ops)
        self.act_fn = XIELU()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, False, comm, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class ApertusForCausalLM(LlamaForCausalLM):
    """Apertus, the Swiss open model: Llama 3 rope scaling and q/k norms, with a single up projection
    through xIELU in place of the gated MLP."""

    qk_norm = True
    renamed = {".attention_layernorm.": ".input_layernorm.", ".feedforward_layernorm.": ".post_attention_layernorm."}
    packed = {k: v for k, v in LlamaForCausalLM.packed.items() if v[0] == ".qkv_proj."}

    def make_mlp(self, config, comm: Communicator, ops: dict, index: int) -> nn.Module:
        return ApertusMLP(config, comm, ops)
