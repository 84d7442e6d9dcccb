"""Numerical checks and timings of the Triton kernels (paged.backends.cuda.kernels) against torch references.

The checks are shared: tests/kernels/test_triton_kernels.py runs them at toy sizes on the CPU through the
Triton interpreter, and `main(outdir)` runs them at serving sizes on a CUDA GPU, then times every kernel
and its plain-torch counterpart with triton.testing.do_bench (median) and reports achieved bandwidth.
Importing this module needs triton but no GPU.

    python benchmarks/kernel_check.py OUTDIR     # on a machine with an NVIDIA GPU
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from paged.backends.cuda.kernels import activation, norm, rotary
from paged.backends.cuda.kernels.attention import TritonPagedAttention
from paged.backends.interface import AttentionMetadata
from paged.models import ops

# A sequence of a step: (new tokens, context length including them). (0, 0) and (1, 0) are the padding
# sequences a CUDA-graph batch is filled up with.
SeqSpec = tuple[int, int]


def tolerance(dtype: torch.dtype) -> float:
    """Bound on ||out - ref|| / ||ref|| against a float64 reference."""
    return 1e-3 if dtype == torch.float32 else 1e-2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def verify_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Assert out is finite and within tol of ref (relative Frobenius error); returns the error."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    err = relative_error(out, ref)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"
    return err


def assert_same_bits(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality, NaN equal to NaN (poisoned cache slots must stay poisoned)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


# --- paged attention --------------------------------------------------------------------------------------


@dataclass
class PagedBatch:
    """One step of paged attention with everything a reference needs to check it."""

    query: torch.Tensor  # [tokens, heads, head_dim], a view into one qkv tensor like a model's
    key: torch.Tensor  # [tokens, kv_heads, head_dim], likewise
    value: torch.Tensor
    kv_cache: torch.Tensor  # before the step: cached prefixes in place, every other slot `poison`
    meta: AttentionMetadata
    specs: list[SeqSpec]
    context_k: list[torch.Tensor]  # per sequence, its whole context [seq_len, kv_heads, head_dim]
    context_v: list[torch.Tensor]

    @property
    def group(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def rows(self, padding: bool) -> torch.Tensor:
        """Token rows of real sequences (padding=False), or of padding sequences and unowned tokens."""
        owned = torch.zeros(self.query.shape[0], dtype=torch.bool)
        start = 0
        for query_len, seq_len in self.specs:
            owned[start : start + query_len] = seq_len > 0
            start += query_len
        return (~owned if padding else owned).nonzero().squeeze(1).to(self.query.device)


def make_paged_batch(
    specs: Sequence[SeqSpec],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    page_size: int = 16,
    poison: float = float("nan"),
    trailing_tokens: int = 0,
) -> PagedBatch:
    """Random step over a cache whose pages are handed out in shuffled order.

    Block-table entries past a sequence's pages point at random (poisoned) pages, so a kernel that reads
    past the context picks up `poison`. trailing_tokens adds padding tokens (slot -1) owned by no sequence.
    """
    num_heads = num_kv_heads * group
    pages = [math.ceil(seq_len / page_size) for _, seq_len in specs]
    num_blocks = sum(pages) + 4
    order = torch.randperm(num_blocks).tolist()
    block_tables = torch.randint(0, num_blocks, (len(specs), max(1, *pages)), dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, page_size, num_kv_heads, head_dim), poison, dtype=dtype, device=device)
    num_tokens = sum(query_len for query_len, _ in specs) + trailing_tokens
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
    query, key, value = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)

    slots, context_k, context_v, start = [], [], [], 0
    for b, (query_len, seq_len) in enumerate(specs):
        block_tables[b, : pages[b]] = torch.tensor(order[: pages[b]], dtype=torch.int32)
        order = order[pages[b] :]
        pos = torch.arange(seq_len)
        seq_slots = (block_tables[b, pos // page_size].long() * page_size + pos % page_size).to(device)
        prefix = seq_len - query_len if seq_len else 0
        context = torch.randn(2, seq_len, num_kv_heads, head_dim, device=device).to(dtype)
        if seq_len:
            context[0, prefix:] = key[start : start + query_len]
            context[1, prefix:] = value[start : start + query_len]
            slots.append(seq_slots[prefix:])
        else:
            slots.append(torch.full((query_len,), -1, dtype=torch.long, device=device))
        kv_cache[0].view(-1, num_kv_heads, head_dim)[seq_slots[:prefix]] = context[0, :prefix]
        kv_cache[1].view(-1, num_kv_heads, head_dim)[seq_slots[:prefix]] = context[1, :prefix]
        context_k.append(context[0])
        context_v.append(context[1])
        start += query_len
    slots.append(torch.full((trailing_tokens,), -1, dtype=torch.long, device=device))

    query_lens = torch.tensor([q for q, _ in specs], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        query_start_loc=F.pad(query_lens.cumsum(0), (1, 0)).to(torch.int32).to(device),
        seq_lens=torch.tensor([s for _, s in specs], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(q for q, _ in specs),
        max_seq_len=max(s for _, s in specs),
        block_size=page_size,
    )
    return PagedBatch(query, key, value, kv_cache, meta, list(specs), context_k, context_v)


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """A standard-layout cache in the CPU backend's layout, where TorchPagedAttention reads it."""
    return cache.transpose(2, 3).contiguous()


def dense_reference(batch: PagedBatch, scale: float) -> torch.Tensor:
    """float64 attention per sequence over its whole K/V (no block table); padding rows are zero."""
    out = torch.zeros(batch.query.shape, dtype=torch.float64, device=batch.query.device)
    start = 0
    for b, (query_len, seq_len) in enumerate(batch.specs):
        if seq_len:
            q = batch.query[start : start + query_len].double().transpose(0, 1)  # [heads, q, d]
            k = batch.context_k[b].double().repeat_interleave(batch.group, dim=1).transpose(0, 1)
            v = batch.context_v[b].double().repeat_interleave(batch.group, dim=1).transpose(0, 1)
            scores = q @ k.transpose(1, 2) * scale
            query_pos = seq_len - query_len + torch.arange(query_len, device=q.device)
            visible = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[start : start + query_len] = (probs @ v).transpose(0, 1)
        start += query_len
    return out


def expected_cache(batch: PagedBatch) -> torch.Tensor:
    """The cache after the step's write: the new K/V at their slots, every other slot as before."""
    cache = batch.kv_cache.clone()
    writes = batch.meta.slot_mapping >= 0
    _, _, _, num_kv_heads, head_dim = cache.shape
    slots = batch.meta.slot_mapping[writes]
    cache[0].view(-1, num_kv_heads, head_dim)[slots] = batch.key[writes].to(cache.dtype)
    cache[1].view(-1, num_kv_heads, head_dim)[slots] = batch.value[writes].to(cache.dtype)
    return cache


def verify_attention(
    name: str, batch: PagedBatch, out: torch.Tensor, kv_cache_after: torch.Tensor, scale: float
) -> float:
    """Check an attention step: output against the dense float64 reference, padding rows finite, cache
    written exactly at the new slots. Returns the relative error."""
    assert_same_bits(f"{name} kv cache", kv_cache_after, expected_cache(batch))
    assert torch.isfinite(out[batch.rows(padding=True)]).all(), f"{name}: non-finite padding rows"
    real = batch.rows(padding=False)
    ref = dense_reference(batch, scale)
    return verify_close(name, out[real], ref[real], tolerance(batch.query.dtype))


# --- an fp8 KV cache --------------------------------------------------------------------------------------

# The extra error allowed against the original K/V (relative, as `tolerance`): e4m3 rounds each element to
# 3 mantissa bits, moving it by at most 2**-4 of itself, and to first order the keys (through the scores)
# and the values (through the weighted sum) each move the output by about that much.
FP8_TOLERANCE = 2 * 2**-4


def kv_scales(kv_scale: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
    """(k_scale, v_scale) on the device; None means 1, as in Attention.forward."""
    return torch.ones(2, device=device) if kv_scale is None else kv_scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch's own cast of clamp(x / scale): what an fp8 cache must hold, byte for byte (NaN stays NaN).

    `scale` is a 0-dim tensor on x's device: torch on CUDA divides by a host scalar through its reciprocal,
    which can round differently from a division.
    """
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def fp8_batch(batch: PagedBatch, kv_scale: torch.Tensor | None, dtype: torch.dtype = torch.float8_e4m3fn
              ) -> PagedBatch:
    """The batch over an fp8 cache: its cached prefixes (and poison) quantized as the step writes new K/V."""
    scales = kv_scales(kv_scale, batch.kv_cache.device)
    cache = torch.stack([quantize_fp8(batch.kv_cache[part], scales[part], dtype) for part in range(2)])
    return dataclasses.replace(batch, kv_cache=cache)


def expected_fp8_cache(batch: PagedBatch, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """The fp8 cache after the step's write: the new K/V quantized at their slots, every other byte as before."""
    scales = kv_scales(kv_scale, batch.kv_cache.device)
    cache = batch.kv_cache.clone()
    writes = batch.meta.slot_mapping >= 0
    slots = batch.meta.slot_mapping[writes]
    _, _, _, num_kv_heads, head_dim = cache.shape
    for part, new in enumerate((batch.key, batch.value)):
        quantized = quantize_fp8(new[writes], scales[part], cache.dtype)
        cache[part].view(torch.uint8).view(-1, num_kv_heads, head_dim)[slots] = quantized.view(torch.uint8)
    return cache


def dequantized(batch: PagedBatch, kv_cache_after: torch.Tensor, kv_scale: torch.Tensor | None) -> PagedBatch:
    """The batch with every context replaced by what the written cache holds times the scales, read through
    the block tables: the input of the reference that a kernel must match up to its own rounding."""
    scales = kv_scales(kv_scale, batch.kv_cache.device).double()
    page_size, (_, _, _, num_kv_heads, head_dim) = batch.meta.block_size, kv_cache_after.shape
    contexts: list[list[torch.Tensor]] = [[], []]
    for seq, (_, seq_len) in enumerate(batch.specs):
        pos = torch.arange(seq_len, device=kv_cache_after.device)
        slots = batch.meta.block_tables[seq, pos // page_size].long() * page_size + pos % page_size
        for part in range(2):
            contexts[part].append(kv_cache_after[part].view(-1, num_kv_heads, head_dim)[slots].double() * scales[part])
    return dataclasses.replace(batch, context_k=contexts[0], context_v=contexts[1])


def verify_fp8_attention(
    name: str, batch: PagedBatch, out: torch.Tensor, kv_cache_after: torch.Tensor, scale: float,
    kv_scale: torch.Tensor | None,
) -> tuple[float, float]:  # fmt: skip
    """Check a step over an fp8 cache: the cache's values (exactly torch's cast; compared as floats, since
    the H200's kernel writes +0 where torch keeps the sign of a negative value that rounds to zero), padding
    rows finite, the output within `tolerance` of attention over the dequantized cache and within
    FP8_TOLERANCE more of attention over the original K/V. Returns both relative errors."""
    assert_same_bits(f"{name} kv cache", kv_cache_after.float(), expected_fp8_cache(batch, kv_scale).float())
    assert torch.isfinite(out[batch.rows(padding=True)]).all(), f"{name}: non-finite padding rows"
    real, tol = batch.rows(padding=False), tolerance(batch.query.dtype)
    exact_ref = dense_reference(dequantized(batch, kv_cache_after, kv_scale), scale)
    exact = verify_close(f"{name} vs the dequantized cache", out[real], exact_ref[real], tol)
    original = verify_close(f"{name} vs the original K/V", out[real], dense_reference(batch, scale)[real],
                            FP8_TOLERANCE + tol)  # fmt: skip
    return exact, original


# --- layer ops ---------------------------------------------------------------------------------------------


@dataclass
class OpInputs:
    """Inputs of every layer op at one size."""

    x: torch.Tensor  # [tokens, hidden]
    residual: torch.Tensor
    weight: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [tokens, 2 * inter]
    positions: torch.Tensor  # [tokens]
    qkv: torch.Tensor  # [tokens, (heads + 2 * kv_heads) * head_dim]
    num_heads: int
    num_kv_heads: int
    cos_sin: torch.Tensor  # [max_positions, head_dim]
    eps: float = 1e-6

    def qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh query/key views into a copy of qkv (rotary works in place)."""
        head_dim = self.cos_sin.shape[1]
        sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        q, k, _ = self.qkv.clone().split(sizes, dim=1)
        return q, k


def make_op_inputs(
    tokens: int, hidden: int, inter: int, num_heads: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device | str, max_positions: int = 4096,
) -> OpInputs:  # fmt: skip
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return OpInputs(
        x=rand(tokens, hidden),
        residual=rand(tokens, hidden),
        weight=1.0 + 0.1 * rand(hidden),
        gate_up=rand(tokens, 2 * inter),
        positions=torch.randint(0, max_positions, (tokens,), device=device),
        qkv=rand(tokens, (num_heads + 2 * num_kv_heads) * head_dim),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        cos_sin=torch.cat((angles.cos(), angles.sin()), dim=1).float().to(device),
    )


def check_ops(inputs: OpInputs) -> dict[str, float]:
    """Every Triton layer op against paged.models.ops in the input dtype and in float64.

    Returns the relative errors against float64; the plain-torch versions must agree just as closely.
    """
    tol = tolerance(inputs.x.dtype)
    x, residual, weight, eps = inputs.x, inputs.residual, inputs.weight, inputs.eps
    errors: dict[str, float] = {}

    def compare(name: str, out: torch.Tensor, native: torch.Tensor, exact: torch.Tensor) -> None:
        assert out.dtype == native.dtype, f"{name}: dtype {out.dtype} != {native.dtype}"
        verify_close(f"{name} vs torch", out, native, tol)
        errors[name] = verify_close(f"{name} vs float64", out, exact, tol)

    compare("rms_norm", norm.rms_norm(x, weight, eps), ops.rms_norm(x, weight, eps),
            ops.rms_norm(x.double(), weight.double(), eps))  # fmt: skip
    normed, new_residual = norm.add_rms_norm(x, residual, weight, eps)
    native_normed, native_residual = ops.add_rms_norm(x, residual, weight, eps)
    exact_normed, exact_residual = ops.add_rms_norm(x.double(), residual.double(), weight.double(), eps)
    compare("add_rms_norm", normed, native_normed, exact_normed)
    compare("add_rms_norm residual", new_residual, native_residual, exact_residual)

    q, k = inputs.qk()
    native_q, native_k = ops.rotary(inputs.positions, q, k, inputs.cos_sin)
    exact_q, exact_k = ops.rotary(inputs.positions, q.double(), k.double(), inputs.cos_sin.double())
    out_q, out_k = rotary.rotary(inputs.positions, q, k, inputs.cos_sin)
    compare("rotary", *(torch.cat(pair, dim=1) for pair in ((out_q, out_k), (native_q, native_k), (exact_q, exact_k))))

    compare("silu_and_mul", activation.silu_and_mul(inputs.gate_up), ops.silu_and_mul(inputs.gate_up),
            ops.silu_and_mul(inputs.gate_up.double()))  # fmt: skip
    return errors


# --- full-size run on a GPU --------------------------------------------------------------------------------


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU."""
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def _attention_case(
    name: str, batch: PagedBatch, scale: float, max_model_len: int, results: dict[str, dict[str, float]]
) -> None:
    """Check one step at full size against the dense float64 reference, then time Triton (write + attention).
    (TorchPagedAttention, the CPU backend's, runs CPU-only kernels: the CPU tests compare the two.)"""
    triton_attn = TritonPagedAttention(max_model_len)
    meta = batch.meta
    meta.prepared = triton_attn.prepare(meta)
    cache = batch.kv_cache.clone()
    out = triton_attn.forward(batch.query, batch.key, batch.value, cache, meta, scale)
    err = verify_attention(name, batch, out, cache, scale)
    triton_ms = _bench(lambda: triton_attn.forward(batch.query, batch.key, batch.value, cache, meta, scale))
    item = batch.kv_cache.element_size()
    kv_row = batch.key.shape[1] * batch.key.shape[2] * item  # bytes of one position's K (or V)
    head_dim, num_heads = batch.query.shape[2], batch.query.shape[1]
    flops = sum(4 * num_heads * head_dim * (q * (s - q) + q * (q + 1) // 2) for q, s in batch.specs)
    kv_bytes = sum(2 * s * kv_row for _, s in batch.specs) + 2 * batch.query.numel() * item
    results[name] = {
        "rel_err": err,
        "triton_ms": triton_ms,
        "triton_tflops": flops / triton_ms / 1e9,
        "triton_min_bytes_gbps": kv_bytes / triton_ms / 1e6,
    }


def _fp8_attention_case(
    name: str, batch: PagedBatch, scale: float, max_model_len: int, kv_scale: torch.Tensor,
    results: dict[str, dict[str, float]],
) -> None:  # fmt: skip
    """One step over an fp8 (e4m3) cache at full size, checked as verify_fp8_attention does, then timed."""
    batch = fp8_batch(batch, kv_scale)
    attn = TritonPagedAttention(max_model_len)
    meta = batch.meta
    meta.prepared = attn.prepare(meta)
    cache = batch.kv_cache.clone()
    out = attn.forward(batch.query, batch.key, batch.value, cache, meta, scale, kv_scale)
    err, original_err = verify_fp8_attention(name, batch, out, cache, scale, kv_scale)
    triton_ms = _bench(lambda: attn.forward(batch.query, batch.key, batch.value, cache, meta, scale, kv_scale))
    kv_row = batch.key.shape[1] * batch.key.shape[2]  # bytes of one position's K (or V) in fp8
    kv_bytes = sum(2 * s * kv_row for _, s in batch.specs) + 2 * batch.query.numel() * batch.query.element_size()
    results[name] = {
        "rel_err": err,
        "rel_err_vs_unquantized": original_err,
        "triton_ms": triton_ms,
        "triton_min_bytes_gbps": kv_bytes / triton_ms / 1e6,
    }


def _decode_split_sweep(name: str, batch: PagedBatch, scale: float, results: dict[str, dict[str, float]]) -> None:
    """Decode time by split count (the count is fixed per engine from max_model_len)."""
    from paged.backends.cuda.kernels.attention import decode_attention

    item = batch.kv_cache.element_size()
    kv_bytes = sum(2 * s * batch.key.shape[1] * batch.key.shape[2] * item for _, s in batch.specs)
    for splits in (1, 2, 4, 8, 16):
        ms = _bench(lambda: decode_attention(batch.query, batch.kv_cache, batch.meta, scale, splits))
        results[f"{name}_splits_{splits}"] = {"triton_ms": ms, "kv_read_gbps": kv_bytes / ms / 1e6}


def _check_decode_graph(batch: PagedBatch, scale: float, max_model_len: int,
                        kv_scale: torch.Tensor | None = None) -> float:
    """Capture one decode step in a CUDA graph, change the step's tensors (kv_scale among them) in place,
    replay, compare."""
    attn = TritonPagedAttention(max_model_len)
    meta, cache = batch.meta, batch.kv_cache.clone()
    attn.forward(batch.query, batch.key, batch.value, cache, meta, scale, kv_scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.forward(batch.query, batch.key, batch.value, cache, meta, scale, kv_scale)
    meta.seq_lens.sub_(torch.randint_like(meta.seq_lens, 0, 8)).clamp_(min=1)
    batch.query.normal_()
    if kv_scale is not None:
        kv_scale.mul_(1.5)
    graph.replay()
    eager = attn.forward(batch.query, batch.key, batch.value, cache, meta, scale, kv_scale)
    return relative_error(out, eager)


def main(outdir: str | Path) -> dict[str, dict[str, float]]:
    """Full-size checks and timings on the current CUDA device; writes OUTDIR/kernel_check.json."""
    assert torch.cuda.is_available(), "kernel_check.main needs a CUDA GPU"
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = {"num_kv_heads": 8, "group": 4, "head_dim": 64, "dtype": dtype, "device": device}
    scale, max_model_len = 64**-0.5, 4096
    results: dict[str, dict[str, float]] = {}

    _attention_case("prefill_256x512", make_paged_batch([(512, 512)] * 256, **shape), scale, max_model_len, results)
    wide = make_paged_batch([(512, 512)] * 64, **{**shape, "head_dim": 128})
    _attention_case("prefill_64x512_d128", wide, 128**-0.5, max_model_len, results)
    mixed = [(256, 768)] * 32 + [(1, 700 + i) for i in range(128)]
    _attention_case("mixed_prefix_and_decode", make_paged_batch(mixed, **shape), scale, max_model_len, results)
    decode = make_paged_batch([(1, 768)] * 256, **shape)
    _attention_case("decode_256x768", decode, scale, max_model_len, results)
    _decode_split_sweep("decode_256x768", decode, scale, results)
    long_decode = make_paged_batch([(1, 4096)] * 16, **shape)
    _attention_case("decode_16x4096", long_decode, scale, max_model_len, results)
    _decode_split_sweep("decode_16x4096", long_decode, scale, results)

    # An fp8 (e4m3) cache with scales that are not 1, the cache written and read by the same kernels.
    kv_scale = torch.tensor([0.05, 3.0], device=device)
    prefill_fp8 = make_paged_batch([(512, 512)] * 256, **shape)
    _fp8_attention_case("prefill_256x512_fp8", prefill_fp8, scale, max_model_len, kv_scale, results)
    _fp8_attention_case("decode_256x768_fp8", decode, scale, max_model_len, kv_scale, results)
    _fp8_attention_case("decode_16x4096_fp8", long_decode, scale, max_model_len, kv_scale, results)
    fp8_decode = fp8_batch(make_paged_batch([(1, 768)] * 256, **shape), kv_scale)
    results["decode_cuda_graph_fp8"] = {
        "rel_err_vs_eager": _check_decode_graph(fp8_decode, scale, max_model_len, kv_scale.clone())
    }
    results["decode_cuda_graph"] = {"rel_err_vs_eager": _check_decode_graph(decode, scale, max_model_len)}

    # Dense causal flash attention (no paging) over the same prefill shapes: the speed to aim for.
    q = torch.randn(256, 32, 512, 64, device=device, dtype=dtype)
    k, v = torch.randn(2, 256, 8, 512, 64, device=device, dtype=dtype)
    results["sdpa_dense_prefill_256x512"] = {
        "torch_ms": _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    }

    inputs = make_op_inputs(8192, 4096, 14336, 32, 8, 128, dtype, device)
    errors = check_ops(inputs)
    item = inputs.x.element_size()
    row = inputs.x.shape[1] * item
    tokens = inputs.x.shape[0]
    q, k = inputs.qk()
    timed: dict[str, tuple[Callable[[], object], Callable[[], object], int]] = {
        "rms_norm": (lambda: norm.rms_norm(inputs.x, inputs.weight, inputs.eps),
                     lambda: ops.rms_norm(inputs.x, inputs.weight, inputs.eps), 2 * tokens * row),
        "add_rms_norm": (lambda: norm.add_rms_norm(inputs.x, inputs.residual, inputs.weight, inputs.eps),
                         lambda: ops.add_rms_norm(inputs.x, inputs.residual, inputs.weight, inputs.eps),
                         4 * tokens * row),
        "rotary": (lambda: rotary.rotary(inputs.positions, q, k, inputs.cos_sin),
                   lambda: ops.rotary(inputs.positions, q, k, inputs.cos_sin),
                   2 * (q.numel() + k.numel()) * item),
        "silu_and_mul": (lambda: activation.silu_and_mul(inputs.gate_up),
                         lambda: ops.silu_and_mul(inputs.gate_up), inputs.gate_up.numel() * item * 3 // 2),
    }  # fmt: skip
    for name, (triton_fn, torch_fn, nbytes) in timed.items():
        triton_ms, torch_ms = _bench(triton_fn), _bench(torch_fn)
        results[name] = {
            "rel_err": errors[name],
            "triton_ms": triton_ms,
            "torch_ms": torch_ms,
            "triton_gbps": nbytes / triton_ms / 1e6,
        }

    for name, values in results.items():
        print(f"{name:32s} " + "  ".join(f"{key}={value:.4g}" for key, value in values.items()))
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), **results}, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
