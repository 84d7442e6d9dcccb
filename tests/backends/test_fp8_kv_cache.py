"""An fp8 (e4m3) KV cache with per-layer scales in TorchPagedAttention (the CPU backend, every kernel's reference).

The cache must hold exactly what torch's own cast makes of clamp(x / scale) (compared byte for byte,
saturated values included), and the output must be attention over those values times the scale.

Tolerances, as relative Frobenius errors against float64:
- against attention over the dequantized cache contents, what the implementation computes up to float
  rounding: EXACT_TOLERANCE. It computes in float32 from the dequantized values on, so with a bfloat16
  query only the output's own rounding (at most 2**-8 of each element) is left, and 1e-5 covers float32;
- against attention over the original keys and values: FP8_TOLERANCE = 2 * 2**-4 on top of that.
  Rounding to e4m3's 3 mantissa bits moves each element by at most 2**-4 (u) of itself. Through the
  weighted sum, errors of u in the values move the output by about u at most; through the scores (of
  unit size here: unit-variance q and k, scale head_dim**-0.5), errors of u in the keys move each weight
  by a factor of about 1 +- u, and the output by about u again. 2u bounds the pair to first order;
  random errors mostly cancel, and the measured errors are near 0.03.

Inputs are fresh random draws; the seed is printed, so a failure can be replayed.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from paged.backends.cpu.attention import TorchPagedAttention
from paged.backends.cpu.backend import CPUBackend
from tests.backends.attention_cases import Case, build_case

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_TOLERANCE = 2 * 2**-4
EXACT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5}

# (context lengths, query lengths): steps of each kind. Decode steps of fewer and of more than
# MATMUL_DECODE_FROM_SEQS sequences take different paths, as does one sequence decoding alone.
CASES = {
    "prefill": ([5, 23, 1, 16], [5, 23, 1, 16]),
    "cached-prefix": ([30, 9, 17], [4, 9, 1]),
    "decode": ([1, 40, 4, 8, 9, 33], [1] * 6),
    "decode-many": ([3, 40, 4, 8, 9, 33, 17, 2, 25], [1] * 9),
    "decode-one": ([37], [1]),
    "mixed": ([17, 5, 33, 8], [17, 1, 4, 1]),
}
SCALES = {"none": None, "k0.05-v3": (0.05, 3.0), "k3-v0.05": (3.0, 0.05)}


@pytest.fixture(autouse=True)
def seed() -> int:
    value = random.randrange(2**31)
    print(f"seed={value}")  # shown by pytest when the test fails
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="module", params=["torch", "backend"])
def attention(request: pytest.FixtureRequest) -> TorchPagedAttention:
    """Plain torch, and the CPU backend's own (whose compiled kernels write the cache where they load)."""
    return TorchPagedAttention() if request.param == "torch" else CPUBackend().attention(max_model_len=64)


def expected_cache(case: Case, scales: tuple[float, float]) -> torch.Tensor:
    """The standard-layout cache after the step: every context position of every sequence holds torch's
    cast of clamp(x / scale), every other slot zero."""
    cache = torch.zeros(case.cache.shape, dtype=FP8)
    block_size = case.meta.block_size
    for kv, table in zip(case.full_kv, case.tables):
        for part, (x, scale) in enumerate(zip(kv, scales)):
            quantized = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            for pos in range(x.shape[0]):
                cache[part, table[pos // block_size], pos % block_size] = quantized[pos]
    return cache


def run_fp8(
    case: Case, attention: TorchPagedAttention, kv_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step over an fp8 cache whose cached prefixes were written as the step writes new tokens:
    (output, cache in the standard layout)."""
    scales = (1.0, 1.0) if kv_scale is None else tuple(kv_scale.tolist())
    prefix = torch.stack([(case.cache[i].float() / scales[i]).clamp(-FP8_MAX, FP8_MAX).to(FP8) for i in range(2)])
    cache = prefix.transpose(2, 3).contiguous()  # the CPU backend's head-major layout
    meta = dataclasses.replace(case.meta)
    meta.prepared = attention.prepare(meta)
    out = attention.forward(case.query, case.key, case.value, cache, meta, case.scale, kv_scale)
    return out, cache.transpose(2, 3)


def dequantized_reference(case: Case, cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """float64 attention over the values the written cache represents (read back through the block tables)."""
    scales = torch.ones(2) if kv_scale is None else kv_scale
    block_size = case.meta.block_size
    full_kv = []
    for (k, _), table in zip(case.full_kv, case.tables):
        pos = torch.arange(k.shape[0])
        blocks = torch.tensor(table)[pos // block_size]
        full_kv.append(tuple(cache[part, blocks, pos % block_size].double() * float(scales[part]) for part in range(2)))
    return dataclasses.replace(case, full_kv=full_kv).reference()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == FP8
    mismatched = (actual.view(torch.uint8) != expected.view(torch.uint8)).sum()
    assert mismatched == 0, f"{int(mismatched)} cache bytes differ from torch's cast"


@pytest.mark.parametrize("scales", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", CASES)
def test_fp8_cache_written_exactly_and_attended(attention, kind, dtype, scales):
    case = build_case(*CASES[kind], heads=8, kv_heads=2, head_dim=32, dtype=dtype)
    kv_scale = None if scales is None else torch.tensor(scales, dtype=torch.float32)
    out, cache = run_fp8(case, attention, kv_scale)

    assert_same_bytes(cache, expected_cache(case, scales or (1.0, 1.0)))
    assert out.dtype == dtype and torch.isfinite(out).all()
    exact = relative_error(out, dequantized_reference(case, cache, kv_scale))
    assert exact < EXACT_TOLERANCE[dtype], f"vs the dequantized cache: {exact:.3g}"
    original = relative_error(out, case.reference())
    print(f"{kind} {dtype} {scales}: vs dequantized {exact:.2e}, vs original {original:.4f}")
    assert original < FP8_TOLERANCE + EXACT_TOLERANCE[dtype], f"vs the original K/V: {original:.3g}"


@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_values_past_the_fp8_range_saturate(attention, kind):
    """New keys and values far outside scale * 448 (both signs) are stored as +-448, not NaN, and attended
    as such."""
    case = build_case(*CASES[kind], heads=4, kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    kv_scale = torch.tensor([0.05, 3.0])
    for new, scale in ((case.key, 0.05), (case.value, 3.0)):
        outliers = torch.rand(new.shape) < 0.1
        new[outliers] = (torch.randn(int(outliers.sum())).sign() * scale * FP8_MAX * 4).to(new.dtype)
    starts = case.meta.query_start_loc.tolist()
    for (k, v), a, b in zip(case.full_kv, starts, starts[1:]):  # the case's contexts end in the new tokens
        k[k.shape[0] - (b - a) :], v[v.shape[0] - (b - a) :] = case.key[a:b], case.value[a:b]

    out, cache = run_fp8(case, attention, kv_scale)
    expected = expected_cache(case, (0.05, 3.0))
    assert_same_bytes(cache, expected)
    assert (expected.float().abs() == FP8_MAX).sum() > 0, "the case must saturate something"
    assert torch.isfinite(out).all()
    exact = relative_error(out, dequantized_reference(case, cache, kv_scale))
    assert exact < EXACT_TOLERANCE[torch.bfloat16], exact


@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_kv_scale_is_ignored_without_an_fp8_cache(attention, kind):
    case = build_case(*CASES[kind], heads=4, kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    results = []
    for kv_scale in (None, torch.tensor([0.05, 3.0])):
        cache = case.cache.transpose(2, 3).contiguous()
        meta = dataclasses.replace(case.meta)
        meta.prepared = attention.prepare(meta)
        results.append((attention.forward(case.query, case.key, case.value, cache, meta, case.scale, kv_scale), cache))
    (out, cache), (scaled_out, scaled_cache) = results
    assert torch.equal(out, scaled_out) and torch.equal(cache, scaled_cache)
