"""Paged attention in plain torch: the CPU backend's implementation and every kernel's reference.

The cache keeps each (block, KV head) as one contiguous [block_size, head_dim] tile: its shape is
[2 (K, V), blocks, kv_heads, block_size, head_dim]. One index_select per layer then gathers the keys and
values of every sequence of the step straight into the [seqs, kv_heads, context, head_dim] layout that
attention reads, into a buffer reused by every layer: on a CPU this step is bound by the bytes it moves,
and a gathered copy that needs no further transpose is moved once.

Decode steps of many sequences (one query each) multiply in the cache's dtype with two batched matmuls
and a float32 softmax, as transformers' eager attention does: the flash kernel behind
scaled_dot_product_attention is built for blocks of queries, and on bfloat16 at one query per sequence
it is several times slower, while converting the context to float32 first doubles the bytes moved.
Float32 decode tokens take the compiled kernel where the backend built it (kernels_avx2.c), which reads
the paged cache itself. Each sequence's prefill chunk runs the flash kernel causally over its own tokens
and unmasked over its cached prefix, so nothing above the diagonal is computed and no sequence is padded
to another's length; in a step that also decodes, the decode tokens go their own way. Index tensors and
masks are computed once per step (prepare() and the first layer).

Layers with a sliding window or Gemma 2's soft cap take explicit score matmuls instead (the flash kernel
has neither): a prefill chunk in slices of queries over only the keys its window reaches, decode tokens
through the batched matmuls under a window mask built once per step and window.

A cache of an fp8 dtype holds clamp(key / k_scale) and clamp(value / v_scale) in that dtype; the gathered
context is converted to float32 and multiplied back by its scales before any matmul, so every path
attends over exactly the values the cache represents (the compiled kernel, float32 caches only, never
sees it). As the reference of every kernel, this is the plain definition: a kernel may fold the scales
into the softmax scale and the output instead, which is the same arithmetic up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from paged.backends.interface import Attention, AttentionMetadata


@dataclass
class CacheIndex:
    """Rows of one cache shape that a step reads and writes, shared by every layer of the step."""

    context_tiles: torch.Tensor  # [2 * seqs * kv_heads * blocks_per_seq] into cache.view(-1, block_size, head_dim)
    new_rows: torch.Tensor  # [2 * written tokens * kv_heads] into cache.view(-1, head_dim)
    gathered: torch.Tensor  # the buffer every layer gathers its context into


@dataclass(frozen=True)
class Prefill:
    """One sequence's query tokens of a step that has more than one: rows start:end of the step, the last
    positions of its `length` tokens of context, after a `prefix` already in the cache."""

    seq: int
    start: int
    end: int
    prefix: int
    length: int


@dataclass
class PaddedBatch:
    """What every layer of a step shares: which cache rows it writes and reads, and how its sequences split
    into prefill chunks and single decode tokens."""

    mask: torch.Tensor  # [num_seqs, 1, 1, context] bool: a decode token's keys (its whole context)
    seq_lens: torch.Tensor  # [num_seqs] int64
    write_slots: torch.Tensor  # slot_mapping without padding
    write_rows: torch.Tensor | None  # token rows that write (None: all)
    block_ids: torch.Tensor  # [num_seqs, blocks_per_seq] int64: the block tables cut to the step's context
    prefills: list[Prefill]  # sequences with more than one query token this step
    # In a step with prefills, the query tokens attended one at a time (those of sequences with one, or a few:
    # a token and its drafts): the sequence of each, its row, and how many keys it sees.
    decode_seqs: torch.Tensor | None
    decode_tokens: torch.Tensor | None
    decode_lens: torch.Tensor | None
    # Set when one sequence decodes: it attends to all of its context, so cutting the gathered context to
    # this length replaces the mask (which the flash kernel would first convert, in every layer).
    whole_context: int | None = None
    indexes: dict[tuple, CacheIndex] = field(default_factory=dict)
    windowed: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _decode_meta: AttentionMetadata | None = None

    @cached_property
    def bias(self) -> torch.Tensor:
        """The mask as float32 to add to scores: 0 where allowed, the lowest float elsewhere (not -inf, so
        a padding row that may attend to nothing stays finite)."""
        return torch.zeros(self.mask.shape, device=self.mask.device).masked_fill_(
            ~self.mask, torch.finfo(torch.float32).min)

    def window_bias(self, window: int | None) -> torch.Tensor:
        """`bias` for a decode token that sees only the last `window` keys of its context."""
        if window is None:
            return self.bias
        if window not in self.windowed:
            key_pos = torch.arange(self.mask.shape[-1], device=self.mask.device)
            recent = (key_pos >= (self.seq_lens - window)[:, None]).view(self.mask.shape)
            self.windowed[window] = self.bias.masked_fill(~recent, torch.finfo(torch.float32).min)
        return self.windowed[window]

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        key_pos = torch.arange(self.mask.shape[-1], device=self.mask.device)
        return (key_pos[None, :] < self.decode_lens[:, None]).view(len(self.decode_lens), 1, 1, -1)

    @cached_property
    def decode_bias(self) -> torch.Tensor:
        return torch.zeros(self.decode_mask.shape, device=self.mask.device).masked_fill_(
            ~self.decode_mask, torch.finfo(torch.float32).min)

    def decode_window_bias(self, window: int | None) -> torch.Tensor:
        """`decode_bias` for tokens that see only the last `window` of their keys."""
        if window is None:
            return self.decode_bias
        key_pos = torch.arange(self.mask.shape[-1], device=self.mask.device)
        recent = (key_pos >= (self.decode_lens - window)[:, None]).view(self.decode_mask.shape)
        return self.decode_bias.masked_fill(~recent, torch.finfo(torch.float32).min)

    def decode_meta(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The step's metadata cut to its decoding sequences, for the compiled kernel; their K/V are written
        already (slot -1)."""
        if self._decode_meta is None:
            seqs = self.decode_seqs
            self._decode_meta = AttentionMetadata(
                slot_mapping=torch.full((len(seqs),), -1, dtype=torch.int64, device=seqs.device),
                query_start_loc=torch.arange(len(seqs) + 1, dtype=torch.int32, device=seqs.device),
                seq_lens=self.decode_lens.to(meta.seq_lens.dtype), block_tables=meta.block_tables[seqs].contiguous(),
                max_query_len=1, max_seq_len=meta.max_seq_len, block_size=meta.block_size)
        return self._decode_meta

    def index_for(self, kv_cache: torch.Tensor) -> CacheIndex:
        key = (tuple(kv_cache.shape), kv_cache.dtype)
        if key not in self.indexes:
            self.indexes[key] = self._build_index(kv_cache)
        return self.indexes[key]

    def _build_index(self, kv_cache: torch.Tensor) -> CacheIndex:
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        device = kv_cache.device
        part = torch.arange(2, device=device).view(2, 1, 1, 1) * num_blocks
        heads = torch.arange(kv_heads, device=device).view(1, 1, kv_heads, 1)
        # Tile (part, block, head) is row (part * blocks + block) * kv_heads + head of the [-1, bs, hd] view.
        context_tiles = ((part + self.block_ids.unsqueeze(1).unsqueeze(0)) * kv_heads + heads).reshape(-1)
        block, offset = self.write_slots // block_size, self.write_slots % block_size
        tiles = (part.view(2, 1, 1) + block.view(1, -1, 1)) * kv_heads + heads.view(1, 1, kv_heads)
        new_rows = (tiles * block_size + offset.view(1, -1, 1)).reshape(-1)
        gathered = torch.empty(context_tiles.numel(), block_size, head_dim, dtype=kv_cache.dtype, device=device)
        return CacheIndex(context_tiles, new_rows, gathered)


# A sequence with at most this many query tokens in a step (a decode token and its drafts) has them attended one
# at a time, as decode tokens (the compiled kernel where there is one): a per-sequence prefill call costs more.
SHORT_QUERY = 8


def build_padded_batch(meta: AttentionMetadata) -> PaddedBatch:
    device = meta.seq_lens.device
    seq_lens = meta.seq_lens.long()
    num_tokens = int(meta.query_start_loc[-1])
    blocks_per_seq = -(-meta.max_seq_len // meta.block_size)
    key_pos = torch.arange(blocks_per_seq * meta.block_size, device=device)
    mask = (key_pos[None, :] < seq_lens[:, None]).view(len(seq_lens), 1, 1, -1)

    prefills, decode_seqs, decode_tokens, decode_lens = [], None, None, None
    if meta.max_query_len > 1:
        starts, lengths = meta.query_start_loc.tolist(), seq_lens.tolist()
        singles = []
        for seq, (start, end, length) in enumerate(zip(starts, starts[1:], lengths)):
            if end - start > SHORT_QUERY:
                prefills.append(Prefill(seq, start, end, length - (end - start), length))
            else:  # token i of the few sees the keys up to its own position
                singles.extend((seq, start + i, length - (end - start) + i + 1) for i in range(end - start))
        if singles:
            decode_seqs, decode_tokens, decode_lens = (torch.tensor(v, device=device) for v in zip(*singles))

    slots = meta.slot_mapping[:num_tokens]
    keep = slots >= 0
    if bool(keep.all()):
        write_slots, write_rows = slots, None
    else:
        write_rows = keep.nonzero().squeeze(1)
        write_slots = slots[write_rows]
    block_ids = meta.block_tables[:, :blocks_per_seq].long()
    single_decode = len(seq_lens) == 1 and meta.max_query_len == 1 and int(seq_lens[0]) == meta.max_seq_len
    return PaddedBatch(mask, seq_lens, write_slots, write_rows, block_ids, prefills, decode_seqs, decode_tokens,
                       decode_lens, meta.max_seq_len if single_decode else None)


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype is scaled (torch's one-byte float types, whichever fp8 the device has)."""
    return dtype.is_floating_point and dtype.itemsize == 1


def quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in float32, saturated to dtype's finite range, then cast (rounding to nearest even): what an
    fp8 cache stores. Without the clamp a value past the range would have no fp8 to round to."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def dequantize(context: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """An fp8 context [2 (K, V), ...] as float32 times (k_scale, v_scale). Every fp8 value is a float32, so
    the product's rounding is the only one between the cache and the matmuls."""
    values = context.float()
    if kv_scale is not None:
        values.mul_(kv_scale.view(2, *[1] * (context.dim() - 1)))
    return values


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: PaddedBatch) -> None:
    """Store this step's K/V (already in the cache's dtype when that is fp8) at the slots of the real tokens."""
    new = torch.stack((key, value))  # [2, tokens, kv_heads, head_dim]
    if batch.write_rows is not None:
        new = new[:, batch.write_rows]
    head_dim = kv_cache.shape[-1]
    rows, cache = new.reshape(-1, head_dim).to(kv_cache.dtype), kv_cache.view(-1, head_dim)
    if is_fp8(kv_cache.dtype):  # index_copy_ has no fp8 kernel on the CPU; the bytes are what it would copy
        rows, cache = rows.view(torch.uint8), cache.view(torch.uint8)
    cache.index_copy_(0, batch.index_for(kv_cache).new_rows, rows)


def gather_context(kv_cache: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """Keys and values of every sequence's context: [2, num_seqs, kv_heads, context, head_dim], cache dtype."""
    _, _, kv_heads, block_size, head_dim = kv_cache.shape
    index = batch.index_for(kv_cache)
    torch.index_select(kv_cache.view(-1, block_size, head_dim), 0, index.context_tiles, out=index.gathered)
    seqs, blocks_per_seq = batch.block_ids.shape
    return index.gathered.view(2, seqs, kv_heads, blocks_per_seq * block_size, head_dim)


# Decode steps of fewer sequences take the float32 flash kernel too: their cost is per-call overhead, of
# which it has the least; from here on the bytes of the context dominate (measured in benchmarks/RESULTS.md).
MATMUL_DECODE_FROM_SEQS = 8


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping, in place: softcap * tanh(scores / softcap)."""
    if softcap is None:
        return scores
    return scores.div_(softcap).tanh_().mul_(softcap)


def decode_attention(query: torch.Tensor, context: torch.Tensor, bias: torch.Tensor, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
    """One query per sequence: [seqs, heads, head_dim] over context [2, seqs, kv_heads, length, head_dim]."""
    _, seqs, kv_heads, length, head_dim = context.shape
    group = query.shape[1] // kv_heads  # query heads sharing one KV head, adjacent as in repeat_kv
    keys, values = context.view(2, seqs * kv_heads, length, head_dim)
    scores = torch.bmm(query.reshape(seqs * kv_heads, group, head_dim).to(context.dtype), keys.transpose(1, 2))
    scores = soft_cap(scores.float().mul_(scale), softcap).view(seqs, kv_heads, group, length).add_(bias)
    probs = torch.softmax(scores, dim=-1).to(context.dtype).view(seqs * kv_heads, group, length)
    return torch.bmm(probs, values).view(query.shape).to(query.dtype)


# The flash kernel that also returns each row's log-sum-exp (F.scaled_dot_product_attention keeps it).
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def prefill_attention(query: torch.Tensor, context: torch.Tensor, prefix: int, length: int, scale: float
                      ) -> torch.Tensor:
    """One sequence's prefill chunk, [tokens, heads, head_dim], over context [2, 1, kv_heads, >= length, hd].

    Its queries are the last `tokens` positions of `length`: causal over themselves, unmasked over the
    `prefix` before them. Two flash-kernel calls, one causal and one without a mask, merged by their
    log-sum-exps, skip the masked half that a single call with an explicit mask computes (and the mask).
    """
    tokens, heads, head_dim = query.shape
    kv_heads = context.shape[2]
    group = heads // kv_heads
    keys, values = context[:, 0, :, :length].float()  # [kv_heads, length, head_dim]
    q = query.transpose(0, 1).float().unsqueeze(0)  # [1, heads, tokens, head_dim]
    new_k, new_v = (t[:, prefix:].repeat_interleave(group, 0).unsqueeze(0) for t in (keys, values))
    out, lse = _flash(q, new_k, new_v, 0.0, True, scale=scale)
    if prefix:
        # No mask over the prefix: the query heads sharing a KV head can be rows of one matrix.
        grouped = q.reshape(1, kv_heads, group * tokens, head_dim)
        old, old_lse = _flash(grouped, keys[None, :, :prefix], values[None, :, :prefix], 0.0, False, scale=scale)
        old, old_lse = old.reshape(1, heads, tokens, head_dim), old_lse.reshape(1, heads, tokens)
        top = torch.maximum(lse, old_lse)
        w_new, w_old = (lse - top).exp_().unsqueeze(-1), (old_lse - top).exp_().unsqueeze(-1)
        out = (out * w_new + old * w_old) / (w_new + w_old)
    return out[0].transpose(0, 1).to(query.dtype)


# Query rows per slice of a windowed or capped prefill: bounds its [heads, rows, keys] float32 scores.
_EXPLICIT_QUERY_ROWS = 256


def explicit_prefill_attention(query: torch.Tensor, context: torch.Tensor, prefix: int, length: int, scale: float,
                               window: int | None, softcap: float | None) -> torch.Tensor:
    """prefill_attention's contract for a layer with a sliding window and/or a soft cap: scores as matmuls,
    capped, masked (causal, and to the window) and softmaxed in float32, a slice of queries at a time; each
    slice reads only the keys its window reaches."""
    tokens, heads, head_dim = query.shape
    kv_heads = context.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(query)
    for first in range(0, tokens, _EXPLICIT_QUERY_ROWS):
        rows = min(_EXPLICIT_QUERY_ROWS, tokens - first)
        query_pos = torch.arange(prefix + first, prefix + first + rows)
        lowest = 0 if window is None else max(0, prefix + first - window + 1)
        keys, values = context[:, 0, :, lowest : prefix + first + rows].float()  # [kv_heads, span, head_dim]
        q = query[first : first + rows].float().permute(1, 0, 2).reshape(kv_heads, group * rows, head_dim)
        scores = soft_cap(torch.bmm(q, keys.transpose(1, 2)).mul_(scale), softcap)
        key_pos = torch.arange(lowest, prefix + first + rows)
        seen = key_pos[None, :] <= query_pos[:, None]
        if window is not None:
            seen &= key_pos[None, :] > query_pos[:, None] - window
        scores.view(kv_heads, group, rows, -1).masked_fill_(~seen, float("-inf"))
        attended = torch.bmm(torch.softmax(scores, dim=-1), values)  # [kv_heads, group * rows, head_dim]
        out[first : first + rows] = attended.view(heads, rows, head_dim).transpose(0, 1).to(query.dtype)
    return out


class TorchPagedAttention(Attention):
    """With `kernels` (AVX2Kernels), float32 decode steps over a float32 cache run the compiled kernel,
    which reads the paged cache directly; every other step (an fp8 cache's among them) takes the torch
    path below."""

    def __init__(self, kernels=None) -> None:
        self.kernels = kernels

    def prepare(self, meta: AttentionMetadata) -> PaddedBatch | None:
        if self.kernels is not None and meta.is_decode_only:
            return None  # the kernel needs none of it; a step of another dtype builds it in its first layer
        return build_padded_batch(meta)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        plain = window is None and softcap is None
        if meta.is_decode_only and plain and self._compiled(query, kv_cache):
            return self.kernels.decode_attention(query, key, value, kv_cache, meta, scale)
        if meta.prepared is None:
            meta.prepared = build_padded_batch(meta)
        batch: PaddedBatch = meta.prepared
        fp8 = is_fp8(kv_cache.dtype)
        if fp8:
            k_scale, v_scale = (1.0, 1.0) if kv_scale is None else kv_scale
            key, value = quantize(key, k_scale, kv_cache.dtype), quantize(value, v_scale, kv_cache.dtype)
        if self.kernels is not None:  # its C loop copies bytes, so a quantized fp8 row goes as it is
            self.kernels.write_kv(kv_cache, key, value, meta.slot_mapping[: key.shape[0]])
        else:
            write_kv(kv_cache, key, value, batch)
        context = gather_context(kv_cache, batch)
        if fp8:
            context = dequantize(context, kv_scale)
        if not plain:
            return self._explicit(query, context, batch, scale, window, softcap)
        if batch.decode_seqs is None and not batch.prefills:
            return self._decode(query, context, batch.mask, batch.bias, batch.whole_context, scale)
        out = torch.empty_like(query)
        for p in batch.prefills:
            out[p.start : p.end] = prefill_attention(query[p.start : p.end], context[:, p.seq : p.seq + 1], p.prefix,
                                                     p.length, scale)
        if batch.decode_seqs is not None:
            rows = batch.decode_tokens
            if self._compiled(query, kv_cache):
                out[rows] = self.kernels.decode_attention(query[rows], key[rows], value[rows], kv_cache,
                                                          batch.decode_meta(meta), scale)
            else:
                out[rows] = self._decode(query[rows], context[:, batch.decode_seqs], batch.decode_mask,
                                         batch.decode_bias, None, scale)
        return out

    @staticmethod
    def _explicit(query, context, batch: PaddedBatch, scale, window, softcap) -> torch.Tensor:
        """A step of a layer with a sliding window or a soft cap."""
        if batch.decode_seqs is None and not batch.prefills:
            return decode_attention(query, context, batch.window_bias(window), scale, softcap)
        out = torch.empty_like(query)
        for p in batch.prefills:
            out[p.start : p.end] = explicit_prefill_attention(query[p.start : p.end], context[:, p.seq : p.seq + 1],
                                                              p.prefix, p.length, scale, window, softcap)
        if batch.decode_seqs is not None:
            bias = batch.decode_window_bias(window)
            out[batch.decode_tokens] = decode_attention(query[batch.decode_tokens], context[:, batch.decode_seqs],
                                                        bias, scale, softcap)
        return out

    def _compiled(self, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return (self.kernels is not None and query.dtype == torch.float32 and kv_cache.dtype == torch.float32
                and query.shape[-1] % 8 == 0)

    @staticmethod
    def _decode(query, context, mask, bias, whole_context, scale):
        """One query per sequence, [seqs, heads, head_dim], over context [2, seqs, kv_heads, length, hd]."""
        seqs, heads, head_dim = query.shape
        if seqs >= MATMUL_DECODE_FROM_SEQS:
            return decode_attention(query, context, bias, scale)
        if whole_context is not None:
            context, mask = context[..., :whole_context, :], None
        keys, values = context.float()
        out = F.scaled_dot_product_attention(query.view(seqs, 1, heads, head_dim).transpose(1, 2).float(), keys,
                                             values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(seqs, heads, head_dim).to(query.dtype)
