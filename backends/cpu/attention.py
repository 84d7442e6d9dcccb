"""Paged attention in plain torch: the CPU backend's implementation and every kernel's reference.

Sequences of a step are padded to one [num_seqs, max_query_len] grid so the whole batch is one
scaled_dot_product_attention call per layer; the gather through the block table and the causal mask
over cached prefix + new tokens are computed once per step in prepare(). Attention itself runs in
float32 whatever the model's dtype, as the reference implementations compute their softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paged.backends.interface import Attention, AttentionMetadata


@dataclass
class PaddedBatch:
    """Index tensors that move a ragged step onto the padded grid and back."""

    token_to_grid: torch.Tensor | None  # [num_tokens] flat index into [num_seqs * max_query_len]; None when decode-only
    mask: torch.Tensor  # [num_seqs, 1, max_query_len, max_seq_len] bool, True where a query may attend
    write_slots: torch.Tensor  # slot_mapping without padding
    write_rows: torch.Tensor | None  # token rows that write (None: all)


def build_padded_batch(meta: AttentionMetadata) -> PaddedBatch:
    device = meta.seq_lens.device
    starts = meta.query_start_loc[:-1].long()
    query_lens = meta.query_start_loc[1:].long() - starts
    seq_lens = meta.seq_lens.long()
    num_tokens = int(meta.query_start_loc[-1])
    max_q = meta.max_query_len

    # Position in the context of every grid cell; padded query rows get position 0 so they stay finite.
    row = torch.arange(max_q, device=device)
    query_pos = seq_lens[:, None] - query_lens[:, None] + row[None, :]
    valid_row = row[None, :] < query_lens[:, None]
    query_pos = torch.where(valid_row, query_pos, torch.zeros_like(query_pos))
    key_pos = torch.arange(meta.max_seq_len, device=device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < seq_lens[:, None, None])

    token_to_grid = None
    if max_q > 1:
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens), device=device), query_lens)
        offset = torch.arange(num_tokens, device=device) - starts[seq_of_token]
        token_to_grid = seq_of_token * max_q + offset

    slots = meta.slot_mapping[:num_tokens]
    keep = slots >= 0
    if bool(keep.all()):
        write_slots, write_rows = slots, None
    else:
        write_rows = keep.nonzero().squeeze(1)
        write_slots = slots[write_rows]
    return PaddedBatch(token_to_grid, mask.unsqueeze(1), write_slots, write_rows)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: PaddedBatch) -> None:
    """Store this step's K/V in the cache ([2, blocks, block_size, kv_heads, head_dim])."""
    _, _, _, kv_heads, head_dim = kv_cache.shape
    if batch.write_rows is not None:
        key, value = key[batch.write_rows], value[batch.write_rows]
    kv_cache[0].view(-1, kv_heads, head_dim).index_copy_(0, batch.write_slots, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, kv_heads, head_dim).index_copy_(0, batch.write_slots, value.to(kv_cache.dtype))


def gather_context(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[blocks, block_size, kv_heads, head_dim] -> float32 [num_seqs, kv_heads, max_seq_len, head_dim]."""
    seqs, nblocks = meta.block_tables.shape
    _, block_size, kv_heads, head_dim = cache.shape
    blocks = cache.index_select(0, meta.block_tables.reshape(-1).long()).float()  # a no-op on a float32 cache
    return blocks.view(seqs, nblocks * block_size, kv_heads, head_dim)[:, : meta.max_seq_len].transpose(1, 2)


class TorchPagedAttention(Attention):
    def prepare(self, meta: AttentionMetadata) -> PaddedBatch:
        return build_padded_batch(meta)

    def forward(self, query, key, value, kv_cache, meta, scale):
        batch: PaddedBatch = meta.prepared
        write_kv(kv_cache, key, value, batch)
        num_tokens, num_heads, head_dim = query.shape
        seqs, max_q = meta.num_seqs, meta.max_query_len
        if batch.token_to_grid is None:
            grid = query.view(seqs, 1, num_heads, head_dim)
        else:
            grid = query.new_zeros(seqs * max_q, num_heads, head_dim)
            grid.index_copy_(0, batch.token_to_grid, query)
            grid = grid.view(seqs, max_q, num_heads, head_dim)
        # In float32: the CPU's attention kernels are many times slower on bf16 for these shapes.
        keys = gather_context(kv_cache[0], meta)
        values = gather_context(kv_cache[1], meta)
        out = F.scaled_dot_product_attention(
            grid.transpose(1, 2).float(), keys, values, attn_mask=batch.mask, scale=scale, enable_gqa=True
        ).transpose(1, 2).to(query.dtype)
        if batch.token_to_grid is None:
            return out.reshape(num_tokens, num_heads, head_dim)
        return out.reshape(seqs * max_q, num_heads, head_dim).index_select(0, batch.token_to_grid)
