"""Building blocks shared by every architecture, written for tensor parallelism from the start.

Linear layers are column- or row-parallel over the backend's communicator: each rank holds a slice of
the weight and loads only that slice, and a row-parallel layer all-reduces its partial sums. With a
world of one rank the collectives are identities, so tensor parallelism is a configuration change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paged.backends.interface import Communicator
from paged.quant.gguf import GGUFBlocks


class WeightLoading:
    """Mixin for layers whose checkpoint tensors need slicing or packing into one parameter."""

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        raise NotImplementedError


class BlockLoading:
    """Mixin for layers whose LinearMethod may compute from a GGUF matrix's quantized blocks.

    Each checkpoint part (shard) is kept as this rank's share of it (`cut`), in gguf_blocks; the method packs
    them in process_weights, or dequantizes them into the weight (`place_local`) if the parts do not share
    one type. Only a linear layer cuts blocks; any other takes them with a single rank only.
    """

    num_parts = 1

    def takes_blocks(self, blocks: GGUFBlocks) -> bool:
        """Whether the method computes from this matrix's blocks as this rank would cut them."""
        raise NotImplementedError

    def cut(self, blocks: GGUFBlocks, shard: int) -> GGUFBlocks:
        """This rank's share of a whole checkpoint matrix's blocks (GGUFBlocks, or a GGUFTensor not read yet)."""
        raise NotImplementedError

    def place_local(self, param: nn.Parameter, local: torch.Tensor, shard: int) -> None:
        """Copy this rank's share of checkpoint part `shard`, already cut (`cut`'s, dequantized), into place."""
        self.load_shard(param, local, shard)

    def load_blocks(self, blocks: GGUFBlocks, shard: int | None) -> None:
        if not hasattr(self, "gguf_blocks"):
            self.gguf_blocks: dict[int, GGUFBlocks] = {}
        self.gguf_blocks[shard or 0] = self.cut(blocks, shard or 0)

    def process_weights(self) -> None:
        self.method.process_weights(self)


class LinearBase(nn.Module, WeightLoading, BlockLoading):
    """A linear layer whose product the backend's LinearMethod (or a quantized one) computes; the method
    creates its parameters (a dense weight, or nothing until a quantized format's parts arrive)."""

    def __init__(self, method) -> None:
        super().__init__()
        self.method = method

    @property
    def part_shapes(self) -> list[tuple[int, int]]:
        """Each checkpoint matrix this layer packs, in full (all ranks): [outputs, inputs]."""
        raise NotImplementedError

    def shard_of(self, matrix, part: int = 0):
        """This rank's share of one full checkpoint matrix in a quantized form (quant.matrix or GGUF blocks),
        cut like a dense one."""
        raise NotImplementedError

    def takes_blocks(self, blocks: GGUFBlocks) -> bool:
        return blocks.qtype in self.method.block_types and self.cuts_blocks(blocks)

    def cuts_blocks(self, blocks: GGUFBlocks) -> bool:
        """Whether this rank's share of the matrix falls on whole blocks."""
        return True

    def cut(self, blocks: GGUFBlocks, shard: int) -> GGUFBlocks:
        return self.shard_of(blocks, shard)


class HeldElsewhere(nn.Module):
    """Stands in for a layer another pipeline stage holds, so parameter names keep their checkpoint indices."""


def kv_head_splits(heads: int, kv_heads: int, world_size: int) -> int:
    """Into how many slices the KV heads are cut over `world_size` ranks: one per rank, or, where a model has
    fewer KV heads than ranks, one per KV head, each kept on several ranks. ValueError if the heads do not split."""
    splits = min(kv_heads, world_size)
    if heads % world_size or kv_heads % splits or world_size % splits:
        raise ValueError(f"{heads} attention heads and {kv_heads} KV heads do not split over {world_size} ranks")
    return splits


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's output rows split over ranks; the output stays split.

    Several checkpoint matrices can be packed into one (q/k/v, gate/up): out_sizes names each part's
    full size, and shard `i` of the checkpoint lands in part i of this rank's slice.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, comm: Communicator, ops: dict,
                 part_splits: list[int] | None = None) -> None:
        """`part_splits[i]`: into how many slices part i is cut (default: one per rank); fewer, a divisor of the
        rank count, replicates each slice over consecutive ranks (K and V where KV heads are fewer than ranks)."""
        super().__init__(ops["decoder_linear"])
        self.part_splits = part_splits or [comm.world_size] * len(out_sizes)
        for size, splits in zip(out_sizes, self.part_splits):
            if size % splits or comm.world_size % splits:
                raise ValueError(f"output size {size} does not split into {splits} of {comm.world_size} ranks")
        self.comm = comm
        self.in_features, self.out_sizes = in_features, out_sizes
        self.local_sizes = [size // splits for size, splits in zip(out_sizes, self.part_splits)]
        self.num_parts = len(out_sizes)
        self.method.create_weights(self, sum(self.local_sizes), in_features)
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes)), requires_grad=False) if bias else None

    @property
    def part_shapes(self) -> list[tuple[int, int]]:
        return [(size, self.in_features) for size in self.out_sizes]

    def _slice_of(self, part: int) -> int:
        """Which slice of checkpoint part `part` this rank holds."""
        return self.comm.rank * self.part_splits[part] // self.comm.world_size

    def shard_of(self, matrix, part: int = 0):
        size = self.local_sizes[part]
        return matrix.rows(self._slice_of(part) * size, size)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        index = shard or 0
        size = self.local_sizes[index]
        self.place_local(param, loaded.narrow(0, self._slice_of(index) * size, size), index)

    def place_local(self, param: nn.Parameter, local: torch.Tensor, shard: int) -> None:
        param.data.narrow(0, sum(self.local_sizes[:shard]), self.local_sizes[shard]).copy_(local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Communicator, ops: dict) -> None:
        super().__init__(ops["decoder_linear"])
        if in_features % comm.world_size:
            raise ValueError(f"input size {in_features} is not divisible by the tensor-parallel size {comm.world_size}")
        self.comm = comm
        self.in_features, self.out_features = in_features, out_features
        self.local_in = in_features // comm.world_size
        self.method.create_weights(self, out_features, self.local_in)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def part_shapes(self) -> list[tuple[int, int]]:
        return [(self.out_features, self.in_features)]

    def shard_of(self, matrix, part: int = 0):
        if self.comm.world_size == 1:
            return matrix
        return matrix.columns(self.comm.rank * self.local_in, self.local_in)

    def cuts_blocks(self, blocks: GGUFBlocks) -> bool:
        return blocks.splits_at(self.local_in)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        if param is self.bias:
            param.data.copy_(loaded[:])  # a lazy checkpoint tensor read whole
        else:
            self.place_local(param, loaded.narrow(1, self.comm.rank * self.local_in, self.local_in), 0)

    def place_local(self, param: nn.Parameter, local: torch.Tensor, shard: int) -> None:
        param.data.copy_(local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(self.method.apply(self, x, None))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module, WeightLoading):
    """Embedding rows split over ranks by vocabulary range; each rank fills its rows and they are summed."""

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.local_vocab = math.ceil(vocab_size / comm.world_size)
        self.start = comm.rank * self.local_vocab
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, hidden), requires_grad=False)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        rows = loaded[self.start : self.start + self.local_vocab]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.comm.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding, BlockLoading):
    """Logits over the vocabulary, each rank computing its range and gathering the rest."""

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator, ops: dict) -> None:
        super().__init__(vocab_size, hidden, comm)
        self.method = ops["linear"]
        # False once tied to the embedding: a LinearMethod that repacks the weight must keep it for lookups.
        self.owns_weight = True

    def takes_blocks(self, blocks: GGUFBlocks) -> bool:
        return blocks.qtype in self.method.block_types

    def cut(self, blocks: GGUFBlocks, shard: int) -> GGUFBlocks:
        """This rank's vocabulary range; the last one padded with zero rows to the same size, so that every
        rank's logits have one shape to gather (the padding's are cut off)."""
        if self.comm.world_size == 1:
            return blocks
        held = max(0, min(self.local_vocab, self.vocab_size - self.start))
        return blocks.rows(self.start, held).padded(self.local_vocab)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.method.apply(self, hidden, None)
        return self.comm.all_gather(local, dim=-1)[:, : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, ops: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.eps = eps
        self._norm = ops["rms_norm"]
        self._add_norm = ops["add_rms_norm"]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without a residual: the norm. With one: (norm(x + residual), x + residual)."""
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm, WeightLoading):
    """Gemma's RMSNorm scales by (1 + weight): the checkpoint's weight plus one is kept, so the same norm
    ops (and their fused kernels) compute it."""

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        param.data.copy_(loaded[:].float() + 1.0)


class XIELU(nn.Module):
    """Apertus' xIELU activation (arxiv 2411.13010), with its four learned scalars named as the checkpoint
    names them: quadratic for x > 0, an exponential-linear blend below."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("alpha_p", "alpha_n", "beta", "eps"):
            self.register_parameter(name, nn.Parameter(torch.zeros(1), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)


def layer_windows(config, max_positions: int) -> list[int | None]:
    """Each layer's sliding window (None: it attends to the whole context). Configs that name layer kinds
    (Gemma, Qwen2/3 with use_sliding_window) slide where a layer is "sliding_attention"; others (Mistral,
    Phi-3) slide every layer where sliding_window is set. A window no shorter than the context slides nothing."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    if not window or window >= max_positions:
        return [None] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in kinds]


def uniform_window(config, max_positions: int) -> int | None:
    """The window every layer slides over, where all of them do (Mistral 7B v0.1, Phi-3-mini): then a
    sequence's blocks that fall out of it are never read again and can be handed on."""
    windows = set(layer_windows(config, max_positions))
    return windows.pop() if len(windows) == 1 else None


def rope_inv_freq(rot_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies of rotary embedding over the first rot_dim values of a head, with Llama 3's
    long-context scaling when configured."""
    theta = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope["factor"])
    if kind == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3, longrope are)")


def rope_angles(rot_dim: int, max_positions: int, rope: dict) -> tuple[torch.Tensor, float]:
    """[max_positions, rot_dim / 2] rotation angles, and the factor cos and sin are scaled by.

    LongRoPE (Phi-3/4) divides the frequencies by per-dimension factors: the short ones within the context the
    model was trained on, the long ones beyond it, and scales cos and sin to keep attention's temperature.
    Here a position's angles are fixed by the position alone (short below original_max_position_embeddings,
    long from it on), so a cached key never needs rotating again; transformers instead switches a whole
    sequence to the long factors once it outgrows that context, which gives the same angles for every
    sequence that stays within it."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "longrope":
        return torch.outer(positions, rope_inv_freq(rot_dim, rope)), 1.0
    base = rope_inv_freq(rot_dim, {"rope_theta": rope.get("rope_theta", 10000.0)})
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor") or rope["max_position_embeddings"] / original
    scale = rope.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
    short = torch.outer(positions, base / torch.tensor(rope["short_factor"], dtype=torch.float32))
    long = torch.outer(positions, base / torch.tensor(rope["long_factor"], dtype=torch.float32))
    return torch.where(positions[:, None] < original, short, long), float(scale)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position up to the context length, applied by the rotary op to the first
    `partial_rotary_factor` of each head (all of it but for Phi-4-mini and the like)."""

    def __init__(self, head_dim: int, max_positions: int, rope: dict, ops: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        angles, scale = rope_angles(self.rot_dim, max_positions, rope)
        self.register_buffer("cos_sin", torch.cat((angles.cos(), angles.sin()), dim=-1) * scale, persistent=False)
        self._rotary = ops["rotary"]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if self.rot_dim == self.head_dim:
            return self._rotary(positions, q, k, self.cos_sin)
        tokens = q.shape[0]
        q, k = q.reshape(tokens, -1, self.head_dim), k.reshape(tokens, -1, self.head_dim)
        q_rot, k_rot = self._rotary(positions, q[..., : self.rot_dim].reshape(tokens, -1),
                                    k[..., : self.rot_dim].reshape(tokens, -1), self.cos_sin)
        return (torch.cat((q_rot.reshape(tokens, -1, self.rot_dim), q[..., self.rot_dim :]), -1).reshape(tokens, -1),
                torch.cat((k_rot.reshape(tokens, -1, self.rot_dim), k[..., self.rot_dim :]), -1).reshape(tokens, -1))
