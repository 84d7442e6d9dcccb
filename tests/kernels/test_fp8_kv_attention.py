"""The Triton paged attention over an fp8 (e4m3) KV cache with per-layer scales, through the Triton interpreter.

The batches and the interpreter set-up are test_triton_kernels.py's (as there, the tests run in a fresh
process when triton was imported before TRITON_INTERPRET could be set), the checks benchmarks/kernel_check.py's,
which runs them at full size on a GPU:
- the cache holds, byte for byte, torch's cast of clamp(x / scale), values past the fp8 range saturated;
- the output is within kc.tolerance(dtype) of a float64 reference over the dequantized cache contents
  (1e-3 for float32 queries, 1e-2 for bfloat16 ones, whose probabilities the kernels round to bfloat16 as
  for a bfloat16 cache), and within kc.FP8_TOLERANCE (2 * 2**-4) more of one over the original keys and
  values: e4m3 rounds each element by at most 2**-4 of itself, and to first order the keys (through the
  scores) and the values (through the weighted sum) each move the output by about that much;
- the same cache bytes and output as TorchPagedAttention over an fp8 cache.
Inputs are fresh random draws; the seed is printed, so a failure can be replayed.
"""

from tests.kernels.interpreter import compiled_process, run_in_fresh_process

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from .test_triton_kernels import (  # noqa: E402
    DECODE,
    MIXED,
    SCALE,
    SMALL_TILES,
    batch,
    data_dependent_loops,
    interpreted,
    kc,
    poisoned_like,
)
from .test_triton_kernels import seed  # noqa: E402, F401  (an autouse fixture: a fresh, printed seed per test)

from paged.backends.cpu.attention import TorchPagedAttention  # noqa: E402
from paged.backends.cuda.kernels.attention import (  # noqa: E402
    TritonPagedAttention,
    decode_attention,
    prefill_attention,
    write_kv,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
SCALES = {"none": None, "k0.05-v3": (0.05, 3.0), "k3-v0.05": (3.0, 0.05)}


@compiled_process
def test_in_fresh_process():
    run_in_fresh_process(__file__)


def as_tensor(scales: tuple[float, float] | None) -> torch.Tensor | None:
    return None if scales is None else torch.tensor(scales, dtype=torch.float32)


def fp8_batch(
    specs, group: int, head_dim: int, dtype: torch.dtype, kv_scale: torch.Tensor | None, **kwargs
) -> "kc.PagedBatch":
    return kc.fp8_batch(batch(specs, group, head_dim, dtype, **kwargs), kv_scale)


def assert_same_bytes(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == FP8, name
    kc.assert_same_bits(name, actual.view(torch.uint8), expected.view(torch.uint8))


def verify(
    name: str, b: "kc.PagedBatch", out: torch.Tensor, cache: torch.Tensor, kv_scale: torch.Tensor | None
) -> None:
    exact, original = kc.verify_fp8_attention(name, b, out, cache, SCALE, kv_scale)
    assert (out[b.rows(padding=True)] == 0).all(), f"{name}: padding sequences must come out zero"
    scales = None if kv_scale is None else kv_scale.tolist()
    print(f"{name} {b.query.dtype} {scales}: vs dequantized {exact:.2e}, vs original {original:.4f}")


@interpreted
@pytest.mark.parametrize("scales", SCALES.values(), ids=SCALES.keys())
def test_write_kv_quantizes_exactly_and_saturates(scales):
    """Every new K/V element divided by its scale and cast as torch casts, a tenth of them far past the fp8
    range (both signs); padding tokens (slot -1) and every other slot untouched."""
    kv_scale = as_tensor(scales)
    b = fp8_batch(MIXED, group=2, head_dim=16, dtype=torch.bfloat16, kv_scale=kv_scale, trailing_tokens=2)
    for new, scale in zip((b.key, b.value), scales or (1.0, 1.0)):
        outliers = torch.rand(new.shape) < 0.1
        new[outliers] = (torch.randn(int(outliers.sum())).sign() * scale * FP8_MAX * 4).to(new.dtype)
    cache = b.kv_cache.clone()
    write_kv(b.key, b.value, cache, b.meta.slot_mapping, kv_scale)
    expected = kc.expected_fp8_cache(b, kv_scale)
    assert_same_bytes("write_kv", cache, expected)
    assert (expected.float().abs() == FP8_MAX).any(), "the case must saturate something"


# (GQA group, head_dim, query dtype, tiles, scales): default tiles through TritonPagedAttention, small ones
# (several query tiles and key steps per sequence) straight into a NaN-filled output.
PREFILL_CASES = [
    (2, 32, torch.bfloat16, None, (0.05, 3.0)),
    (1, 16, torch.float32, None, None),
    (3, 32, torch.bfloat16, SMALL_TILES, (3.0, 0.05)),
    (4, 16, torch.float32, SMALL_TILES, (0.05, 3.0)),
]


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("group,head_dim,dtype,tiles,scales", PREFILL_CASES)
def test_prefill_over_fp8_cache(group, head_dim, dtype, tiles, scales):
    kv_scale = as_tensor(scales)
    b = fp8_batch(MIXED, group, head_dim, dtype, kv_scale)
    cache = b.kv_cache.clone()
    if tiles is None:
        attn = TritonPagedAttention(max_model_len=128)
        b.meta.prepared = attn.prepare(b.meta)
        out = attn.forward(b.query, b.key, b.value, cache, b.meta, SCALE, kv_scale)
    else:
        write_kv(b.key, b.value, cache, b.meta.slot_mapping, kv_scale)
        out = prefill_attention(b.query, cache, b.meta, SCALE, tiles, out=poisoned_like(b.query), kv_scale=kv_scale)
    verify("prefill", b, out, cache, kv_scale)


# (GQA group, head_dim, query dtype, splits, tiles, scales): one split, and shares of 16 tokens over up to
# eight splits with small tiles.
DECODE_CASES = [
    (2, 32, torch.bfloat16, 1, None, (0.05, 3.0)),
    (4, 16, torch.float32, 2, None, None),
    (3, 32, torch.bfloat16, 4, SMALL_TILES, (3.0, 0.05)),
    (1, 16, torch.float32, 8, SMALL_TILES, (0.05, 3.0)),
]


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("group,head_dim,dtype,splits,tiles,scales", DECODE_CASES)
def test_decode_over_fp8_cache(group, head_dim, dtype, splits, tiles, scales):
    kv_scale = as_tensor(scales)
    b = fp8_batch(DECODE, group, head_dim, dtype, kv_scale, trailing_tokens=0 if tiles is None else 1)
    cache = b.kv_cache.clone()
    if tiles is None:  # every token owned by a sequence, as the engine's are
        attn = TritonPagedAttention(max_model_len=256 * splits)
        attn.num_sms = 1 << 20  # as if the batch were far too small to fill the GPU: splits follow the length
        b.meta.prepared = attn.prepare(b.meta)
        out = attn.forward(b.query, b.key, b.value, cache, b.meta, SCALE, kv_scale)
    else:
        write_kv(b.key, b.value, cache, b.meta.slot_mapping, kv_scale)
        out = decode_attention(
            b.query, cache, b.meta, SCALE, splits, tiles, poisoned_like(b.query), split_tokens=16, kv_scale=kv_scale
        )
        assert out[-1].isnan().all(), "the token owned by no sequence must be left alone"
        out[-1] = 0
    verify("decode", b, out, cache, kv_scale)


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("specs", [MIXED, DECODE[:-1]], ids=["mixed", "decode"])
def test_matches_torch_paged_attention_over_fp8_cache(specs, dtype):
    """Same cache bytes and outputs as the CPU backend over an fp8 cache (its decode path needs one token
    per sequence), with scales that are not 1."""
    kv_scale = torch.tensor([0.05, 3.0])
    b = fp8_batch(specs, group=3, head_dim=32, dtype=dtype, kv_scale=kv_scale, poison=0.0)
    triton_attn, torch_attn = TritonPagedAttention(max_model_len=64), TorchPagedAttention()
    triton_cache, torch_cache = b.kv_cache.clone(), kc.head_major(b.kv_cache)
    b.meta.prepared = triton_attn.prepare(b.meta)
    out = triton_attn.forward(b.query, b.key, b.value, triton_cache, b.meta, SCALE, kv_scale)
    torch_meta = dataclasses.replace(b.meta, prepared=torch_attn.prepare(b.meta))
    ref = torch_attn.forward(b.query, b.key, b.value, torch_cache, torch_meta, SCALE, kv_scale)
    assert_same_bytes("kv cache", triton_cache, torch_cache.transpose(2, 3))
    real = b.rows(padding=False)
    kc.verify_close("vs TorchPagedAttention", out[real], ref[real], kc.tolerance(dtype))


@interpreted
@data_dependent_loops
def test_kv_scale_is_ignored_without_an_fp8_cache():
    b = batch(MIXED, group=2, head_dim=16, dtype=torch.bfloat16)
    attn = TritonPagedAttention(max_model_len=64)
    b.meta.prepared = attn.prepare(b.meta)
    results = []
    for kv_scale in (None, torch.tensor([0.05, 3.0])):
        cache = b.kv_cache.clone()
        results.append((attn.forward(b.query, b.key, b.value, cache, b.meta, SCALE, kv_scale), cache))
    (out, cache), (scaled_out, scaled_cache) = results
    kc.assert_same_bits("kv cache", scaled_cache, cache)
    kc.assert_same_bits("output", scaled_out, out)
