"""Rotary position embedding (neox layout) applied in place to query and key in one launch.

cos_sin is [max_positions, rot_dim] with cos in the first half and sin in the second; any rope scaling
(llama3 and the like) is already baked into it, so one kernel serves every model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the num_heads heads of one token starting at x_ptr (heads of 2 * HALF contiguous values)."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    first = x_ptr + heads * (2 * HALF) + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    num_q_heads,
    num_k_heads,
    stride_q,
    stride_k,
    stride_cos_sin,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
):
    """One program per token: fetch its cos/sin row once, rotate every query and key head."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    row = cos_sin_ptr + pos * stride_cos_sin + dims
    cos = tl.load(row, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF, mask=dims < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q, num_q_heads, cos, sin, HALF, BLOCK_Q_HEADS, BLOCK_D)
    _rotate_heads(k_ptr + token * stride_k, num_k_heads, cos, sin, HALF, BLOCK_K_HEADS, BLOCK_D)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a [tokens, heads * rot_dim] view; in-place rotation needs each token's heads contiguous."""
    rows = x.view(x.shape[0], -1)
    if rows.stride(-1) != 1:
        raise ValueError("rotary needs the values of each token contiguous")
    return rows


def rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values as paged.models.ops.rotary, but rotates query and key in place and returns them."""
    rot_dim = cos_sin.shape[-1]
    half = rot_dim // 2
    q_rows, k_rows = _token_rows(query), _token_rows(key)
    num_tokens = q_rows.shape[0]
    if num_tokens == 0:
        return query, key
    num_q_heads, num_k_heads = q_rows.shape[1] // rot_dim, k_rows.shape[1] // rot_dim
    if cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    _rotary_kernel[(num_tokens,)](
        q_rows, k_rows, positions, cos_sin, num_q_heads, num_k_heads,
        q_rows.stride(0), k_rows.stride(0), cos_sin.stride(0),
        HALF=half, BLOCK_D=triton.next_power_of_2(half),
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads), BLOCK_K_HEADS=triton.next_power_of_2(num_k_heads),
    )  # fmt: skip
    return query, key
