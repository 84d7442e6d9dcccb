"""Paged attention for Gaudi in plain torch, over static shapes: gathers and masks, no data-dependent sizes.

The Gaudi graph compiler compiles a graph per distinct shape and cannot build one around an op whose
output size depends on tensor contents (nonzero, repeat_interleave by counts). So, unlike the CPU
backend's version, every index here is computed with fixed-size ops, and the step is padded to shape
buckets (sequences, query length, blocks per sequence) so that a handful of graphs serves every step.
It runs unchanged on the CPU, which is how it is tested.

Each step is laid out on a [sequences, query bucket] grid; keys and values of every sequence are
gathered through its (padded) block-table row with index_select, and one scaled_dot_product_attention
call attends under a causal mask over cached prefix + new tokens. A sliding-window layer narrows that
mask (built once per step and window); Gemma 2's soft cap, which the fused call has no place for, takes
explicit score matmuls of the same static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from paged.backends.common.buckets import bucket
from paged.backends.interface import Attention, AttentionMetadata


@dataclass
class StaticBatch:
    """One step's index tensors on the bucketed grid; every shape depends only on bucket sizes."""

    token_to_grid: torch.Tensor  # [num_tokens] row of each token in the flat grid; padding tokens: the spare row
    block_ids: torch.Tensor  # [seqs_bucket * blocks_bucket] the padded block table, flattened
    mask: torch.Tensor  # [seqs_bucket, 1, query_bucket, context] True where a grid row may attend
    seqs: int  # sequences bucket
    query_len: int  # query bucket
    query_pos: torch.Tensor  # [seqs, query_len, 1] each grid row's position in its sequence
    key_pos: torch.Tensor  # [context] positions of the gathered keys
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask of a layer that sees only the last `window` keys up to each row's own position."""
        if window is None:
            return self.mask
        if window not in self.windowed:
            recent = self.key_pos[None, None, :] > self.query_pos - window
            self.windowed[window] = _seeing_something(self.mask & recent.unsqueeze(1))
        return self.windowed[window]


def _seeing_something(mask: torch.Tensor) -> torch.Tensor:
    """Rows that see nothing (padding) see everything instead: their output is finite, then dropped."""
    return mask | ~mask.any(-1, keepdim=True)


def build_static_batch(meta: AttentionMetadata) -> StaticBatch:
    device = meta.seq_lens.device
    num_seqs, width = meta.block_tables.shape
    seqs, query_len, blocks = bucket(num_seqs), bucket(meta.max_query_len, floor=1), bucket(width, floor=1)
    loc = meta.query_start_loc.long()
    starts = torch.cat([loc, loc[-1:].expand(seqs - num_seqs)])  # padding sequences: no tokens
    seq_lens = F.pad(meta.seq_lens.long(), (0, seqs - num_seqs))
    tables = F.pad(meta.block_tables.long(), (0, blocks - width, 0, seqs - num_seqs))

    token = torch.arange(meta.slot_mapping.shape[0], device=device)
    seq = torch.searchsorted(starts[1:], token, right=True).clamp(max=seqs - 1)
    offset = token - starts[seq]
    spare = seqs * query_len  # an extra grid row that padding tokens read from and write to
    token_to_grid = torch.where(token < starts[-1], seq * query_len + offset, spare)

    query_lens = starts[1:] - starts[:-1]
    row = torch.arange(query_len, device=device)
    query_pos = seq_lens[:, None] - query_lens[:, None] + row[None, :]  # [seqs, query_len]
    key_pos = torch.arange(blocks * meta.block_size, device=device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < seq_lens[:, None, None])
    return StaticBatch(token_to_grid, tables.flatten(), _seeing_something(mask).unsqueeze(1), seqs, query_len,
                       query_pos[:, :, None], key_pos)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key/value at slot_mapping ([2, blocks, block_size, kv_heads, head_dim] cache) with a fixed-size copy.

    A padding token (slot -1) repeats the write of the last real token, so every slot written gets one
    value; when no token is real, each write puts back what slot 0 already holds.
    """
    _, _, _, kv_heads, head_dim = kv_cache.shape
    token = torch.arange(slot_mapping.shape[0], device=slot_mapping.device)
    real = slot_mapping >= 0
    last_real = torch.where(real, token, 0).max()
    source = torch.where(real, token, last_real)
    slots = slot_mapping[source].clamp(min=0)
    for cache, new in ((kv_cache[0], key), (kv_cache[1], value)):
        flat = cache.view(-1, kv_heads, head_dim)
        rows = torch.where(real[source][:, None, None], new[source].to(cache.dtype), flat[slots])
        flat.index_copy_(0, slots, rows)


def _gather(cache: torch.Tensor, batch: StaticBatch) -> torch.Tensor:
    """[blocks, block_size, kv_heads, head_dim] -> [seqs, kv_heads, context, head_dim] through the block table."""
    _, _, kv_heads, head_dim = cache.shape
    blocks = cache.index_select(0, batch.block_ids)
    return blocks.view(batch.seqs, -1, kv_heads, head_dim).transpose(1, 2)


class GaudiPagedAttention(Attention):
    def prepare(self, meta: AttentionMetadata) -> StaticBatch:
        return build_static_batch(meta)

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
        """kv_scale scales only an fp8 cache, which this backend does not keep: it is accepted and unused."""
        batch: StaticBatch = meta.prepared
        write_kv(kv_cache, key, value, meta.slot_mapping)
        _, num_heads, head_dim = query.shape
        grid = query.new_zeros(batch.seqs * batch.query_len + 1, num_heads, head_dim)
        grid.index_copy_(0, batch.token_to_grid, query)
        grid = grid[:-1].view(batch.seqs, batch.query_len, num_heads, head_dim).transpose(1, 2)
        keys = _gather(kv_cache[0], batch).to(query.dtype)
        values = _gather(kv_cache[1], batch).to(query.dtype)
        mask = batch.mask_for(window)
        if softcap is None:
            out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            out = _capped_attention(grid, keys, values, mask, scale, softcap)
        out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)
        return torch.cat([out, out.new_zeros(1, num_heads, head_dim)]).index_select(0, batch.token_to_grid)


def _capped_attention(query, keys, values, mask, scale: float, softcap: float) -> torch.Tensor:
    """scaled_dot_product_attention's result with every score s replaced by softcap * tanh(s / softcap)."""
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.tanh(query.float() @ keys.float().transpose(-1, -2) * (scale / softcap)) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ values.float()).to(query.dtype)
