"""The CUDA backend's Triton paged attention, launched with tiles for AMD's CDNA GPUs.

A Triton "warp" on AMD is a 64-lane wavefront, twice NVIDIA's, so the same tile needs half the warps
to keep every lane busy, and AMD's Triton backend pipelines loads differently (its num_stages 1 already
overlaps global loads with compute). These are starting points by that reasoning, not yet measured on
an MI300: the kernels, their split-K decode and the dispatch are the CUDA backend's, unchanged.
"""

from __future__ import annotations

from paged.backends.cuda.kernels.attention import TileConfig


def prefill_config(head_dim: int) -> TileConfig:
    if head_dim <= 128:
        return TileConfig(block_m=128, block_n=64 if head_dim <= 64 else 32, num_warps=4, num_stages=1)
    return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)


def decode_config(head_dim: int) -> TileConfig:
    return TileConfig(block_m=16, block_n=64 if head_dim <= 128 else 32, num_warps=2, num_stages=1)
