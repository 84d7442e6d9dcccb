"""The CUDA backend's Triton paged attention, launched with tiles for AMD's CDNA GPUs.

A Triton "warp" on AMD is a 64-lane wavefront, twice NVIDIA's, so the same tile needs half the warps
to keep every lane busy, and AMD's Triton backend pipelines loads differently (its num_stages 1 already
overlaps global loads with compute). These are starting points by that reasoning, not yet measured on
an MI300: the kernels, their split-K decode and the dispatch are the CUDA backend's, unchanged.
"""

from __future__ import annotations

import torch

from paged.backends.cuda.kernels.attention import (
    TileConfig,
    TritonPagedAttention,
    decode_attention,
    prefill_attention,
    write_kv,
)
from paged.backends.interface import AttentionMetadata


def prefill_config(head_dim: int) -> TileConfig:
    if head_dim <= 128:
        return TileConfig(block_m=128, block_n=64 if head_dim <= 64 else 32, num_warps=4, num_stages=1)
    return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)


def decode_config(head_dim: int) -> TileConfig:
    return TileConfig(block_m=16, block_n=64 if head_dim <= 128 else 32, num_warps=2, num_stages=1)


class ROCmPagedAttention(TritonPagedAttention):
    """TritonPagedAttention with the tiles above; the choice of kernel per step is the parent's."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        head_dim = query.shape[-1]
        write_kv(key, value, kv_cache, meta.slot_mapping)
        if meta.max_query_len <= 1:
            return decode_attention(query, kv_cache, meta, scale, self.num_splits, config=decode_config(head_dim))
        return prefill_attention(query, kv_cache, meta, scale, config=prefill_config(head_dim))
