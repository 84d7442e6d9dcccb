"""Paged attention as a JAX function: the KV write and ragged attention over a paged cache.

The cache of one layer is [num_blocks, block_size, 2 * num_kv_heads, head_dim], K and V of a head
interleaved (K of head h at 2h, V at 2h + 1): the layout of the Pallas ragged paged attention kernel,
so that kernel reads the cache the model writes without a copy.

On TPU the Pallas kernel attends; elsewhere (JAX's CPU platform, in CI) a jnp gather reference does:
every query token gathers its sequence's blocks and attends causally to its context. Both take one
step's ragged batch as it comes (prefill chunks and decode tokens mixed), padded to shape buckets so
that XLA compiles a handful of variants, and the cache is donated so the write happens in place.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import torch

from paged.backends.common.buckets import bucket
from paged.backends.interface import Attention, AttentionMetadata

# Finite: a padding row with no visible key gets a uniform (finite) softmax instead of NaN, then zeros.
_MASKED = -1.0e30


def write_kv(kv_pages: jax.Array, key: jax.Array, value: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """The cache with key/value [tokens, kv_heads, head_dim] stored at slot_mapping (-1: padding, dropped)."""
    num_blocks, block_size, combined, head_dim = kv_pages.shape
    num_slots = num_blocks * block_size
    kv = jnp.stack([key, value], axis=2).reshape(key.shape[0], combined, head_dim)
    slots = jnp.where(slot_mapping >= 0, slot_mapping, num_slots)  # out of range: mode="drop" skips it
    flat = kv_pages.reshape(num_slots, combined, head_dim)
    return flat.at[slots].set(kv.astype(kv_pages.dtype), mode="drop").reshape(kv_pages.shape)


def reference_attention(
    query: jax.Array,
    kv_pages: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal attention of every query token over its sequence's cached context, in float32 (the last
    `window` keys only, scores soft-capped, where the layer says so).

    Tokens past query_start_loc[-1] and sequences of no context (padding) get zero rows.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, combined, _ = kv_pages.shape
    num_kv_heads, num_seqs = combined // 2, seq_lens.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], token, side="right"), 0, num_seqs - 1)
    start = query_start_loc[seq]
    position = seq_lens[seq] - (query_start_loc[seq + 1] - start) + token - start
    context = block_tables.shape[1] * block_size
    pages = kv_pages[block_tables[seq]].reshape(num_tokens, context, num_kv_heads, 2, head_dim)
    keys, values = pages[..., 0, :].astype(jnp.float32), pages[..., 1, :].astype(jnp.float32)
    grouped = query.reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,tlkd->tkgl", grouped, keys, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    key_pos = jnp.arange(context)[None, :]
    visible = (key_pos <= position[:, None]) & (token < query_start_loc[-1])[:, None]
    if window is not None:
        visible &= key_pos > position[:, None] - window
    scores = jnp.where(visible[:, None, None, :], scores, _MASKED)
    out = jnp.einsum("tkgl,tlkd->tkgd", jax.nn.softmax(scores, axis=-1), values,
                     precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(visible.any(axis=1)[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(query.dtype)


def pallas_attention(
    query: jax.Array,
    kv_pages: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """The same contract on TPU, through the Pallas ragged paged attention kernel (imported when used)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    # Padding sequences (no context) sit at the end of the batch, so the real ones are a prefix.
    num_seqs = jnp.sum(seq_lens > 0, dtype=jnp.int32).reshape(1)
    return ragged_paged_attention(query, kv_pages, seq_lens, block_tables, query_start_loc, num_seqs,
                                  sm_scale=scale, sliding_window=window, soft_cap=softcap)


@functools.partial(jax.jit, static_argnames=("scale", "use_pallas", "window", "softcap"),
                   donate_argnames=("kv_pages",))
def attention_step(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    kv_pages: jax.Array,
    slot_mapping: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    scale: float,
    use_pallas: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One layer's step: (attention output, the cache with this step's K/V written)."""
    kv_pages = write_kv(kv_pages, key, value, slot_mapping)
    attend = pallas_attention if use_pallas else reference_attention
    return attend(query, kv_pages, query_start_loc, seq_lens, block_tables, scale, window, softcap), kv_pages


def _pad(x: jax.Array, size: int, value: int | float = 0) -> jax.Array:
    """x padded along its first dimension to `size` rows of `value`."""
    return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def bucketed_step(query, key, value, kv_pages, slot_mapping, query_start_loc, seq_lens, block_tables, scale,
                  use_pallas: bool, window: int | None = None, softcap: float | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """attention_step on inputs padded to shape buckets (tokens, sequences, blocks per sequence).

    Padding tokens write nothing (slot -1) and belong to no sequence; padding sequences have no tokens
    and no context; padding block-table columns are never read. The output is cut back to the tokens.
    """
    num_tokens, num_seqs = query.shape[0], seq_lens.shape[0]
    tokens, seqs = bucket(num_tokens), bucket(num_seqs)
    width = bucket(block_tables.shape[1], floor=1)
    out, kv_pages = attention_step(
        _pad(query, tokens), _pad(key, tokens), _pad(value, tokens), kv_pages, _pad(slot_mapping, tokens, -1),
        _pad(query_start_loc, seqs + 1, query_start_loc[-1]), _pad(seq_lens, seqs),
        jnp.pad(block_tables, [(0, seqs - num_seqs), (0, width - block_tables.shape[1])]),
        scale=scale, use_pallas=use_pallas, window=window, softcap=softcap,
    )  # fmt: skip
    return out[:num_tokens], kv_pages


class JaxPagedAttention(Attention):
    """The backend's Attention: torchax tensors in, the JAX step on their arrays, torchax tensors out.

    The cache tensor is updated in place (its array swapped for the written one), as the model expects.
    """

    def __init__(self, use_pallas: bool) -> None:
        self.use_pallas = use_pallas

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
        from torchax.interop import jax_view, torch_view

        arrays: list[Any] = jax_view([query, key, value, kv_cache, meta.slot_mapping, meta.query_start_loc,
                                      meta.seq_lens, meta.block_tables])
        out, written = bucketed_step(*arrays, scale=scale, use_pallas=self.use_pallas, window=window,
                                     softcap=softcap)
        kv_cache.apply_jax_(lambda _: written)
        return torch_view(out)
