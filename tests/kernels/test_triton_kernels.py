"""The Triton kernels of the CUDA backend, run on the CPU through the Triton interpreter.

Every kernel is checked against a float64 reference and its plain-torch counterpart on small random
shapes; the checks themselves live in benchmarks/kernel_check.py, which runs them at full size on a GPU.
Inputs are fresh random draws; the seed is printed, so a failure can be replayed.

Under the interpreter: see tests/kernels/interpreter.py, imported first.
"""

from tests.kernels.interpreter import INTERPRETED, REPO, compiled_process, interpreted, run_in_fresh_process

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from paged.backends.cpu.attention import TorchPagedAttention  # noqa: E402
from paged.backends.cuda.kernels.attention import (  # noqa: E402
    TileConfig,
    TritonPagedAttention,
    decode_attention,
    decode_splits,
    prefill_attention,
    write_kv,
)


@compiled_process
def test_in_fresh_process():
    run_in_fresh_process(__file__)


@triton.jit
def _count_to(n_ptr):
    """A loop whose bound is read from memory, like the attention kernels' loops over keys."""
    count = 0
    for _ in range(0, tl.load(n_ptr)):
        count += 1
    tl.store(n_ptr, count)


def _interpreter_runs_loaded_loop_bounds() -> bool:
    """Some triton releases (3.6 among them) convert loop bounds with int() on a one-element array, which
    numpy >= 2.4 rejects; their interpreter cannot run the attention kernels (compiled kernels can)."""
    try:
        _count_to[(1,)](torch.full((1,), 3, dtype=torch.int32))
    except Exception:  # an InterpreterError wrapping the TypeError
        return False
    return True


data_dependent_loops = pytest.mark.skipif(
    INTERPRETED and not _interpreter_runs_loaded_loop_bounds(),
    reason="this triton's interpreter cannot run loops with bounds read from memory under this numpy",
)


def _load_kernel_check():
    path = REPO / "benchmarks" / "kernel_check.py"
    spec = importlib.util.spec_from_file_location("kernel_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kc = _load_kernel_check()

# Small tiles: several query tiles and key steps per sequence even at these lengths.
SMALL_TILES = TileConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
SCALE = 0.3
# Sequences (new tokens, context): lengths around and at page boundaries (page size 16), cached prefixes
# (the one of 30 puts a small query tile's first token one key short of a key tile), decode tokens in a
# prefill batch, and the two padding sequences of a CUDA-graph batch, (0, 0) and (1, 0) with slot -1.
MIXED = [(15, 15), (16, 16), (0, 0), (5, 32), (1, 33), (17, 17), (1, 0), (9, 40), (7, 37)]
DECODE = [(1, 15), (1, 16), (1, 17), (1, 32), (1, 1), (1, 45), (1, 300), (1, 0), (0, 0)]


@pytest.fixture(autouse=True)
def seed() -> int:
    value = random.randrange(2**31)
    print(f"seed={value}")  # shown by pytest when the test fails
    torch.manual_seed(value)
    return value


def batch(specs, group: int, head_dim: int, dtype: torch.dtype, **kwargs) -> "kc.PagedBatch":
    return kc.make_paged_batch(
        specs, num_kv_heads=2, group=group, head_dim=head_dim, dtype=dtype, device="cpu", **kwargs
    )


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_writes_only_new_slots(dtype):
    b = batch(MIXED, group=2, head_dim=16, dtype=dtype, trailing_tokens=2)
    cache = b.kv_cache.clone()
    write_kv(b.key, b.value, cache, b.meta.slot_mapping)
    kc.assert_same_bits("write_kv", cache, kc.expected_cache(b))


# (GQA group, head_dim, dtype, tiles): every group ratio, head_dim 16..256, default and small tiles.
PREFILL_CASES = [
    (1, 64, torch.float32, None),
    (3, 32, torch.bfloat16, None),
    (4, 128, torch.float32, None),
    (2, 256, torch.float16, None),
    (1, 16, torch.float32, SMALL_TILES),
    (3, 64, torch.float32, SMALL_TILES),
    (4, 32, torch.bfloat16, SMALL_TILES),
]


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("group,head_dim,dtype,tiles", PREFILL_CASES)
def test_prefill_matches_dense_reference(group, head_dim, dtype, tiles):
    """Default tiles through TritonPagedAttention; small tiles straight into a NaN-filled output."""
    b = batch(MIXED, group, head_dim, dtype)
    cache = b.kv_cache.clone()
    if tiles is None:
        attn = TritonPagedAttention(max_model_len=128)
        b.meta.prepared = attn.prepare(b.meta)
        out = attn.forward(b.query, b.key, b.value, cache, b.meta, SCALE)
    else:
        write_kv(b.key, b.value, cache, b.meta.slot_mapping)
        out = prefill_attention(b.query, cache, b.meta, SCALE, tiles, out=poisoned_like(b.query))
    kc.verify_attention("prefill", b, out, cache, SCALE)
    assert (out[b.rows(padding=True)] == 0).all()


# (GQA group, head_dim, dtype, splits, tiles): one split up to more splits than most contexts fill.
DECODE_CASES = [
    (1, 64, torch.float32, 1, None),
    (3, 32, torch.bfloat16, 4, SMALL_TILES),
    (4, 128, torch.float32, 8, SMALL_TILES),
    (4, 16, torch.bfloat16, 2, None),
    (2, 256, torch.float16, 4, None),
]


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("group,head_dim,dtype,splits,tiles", DECODE_CASES)
def test_decode_matches_dense_reference(group, head_dim, dtype, splits, tiles):
    """Default tiles through TritonPagedAttention (splits from max_model_len, shares of 256 tokens: only the
    300-token context spans two); small tiles with shares of 16 tokens, straight into a NaN-filled output,
    where the token owned by no sequence must stay untouched."""
    b = batch(DECODE, group, head_dim, dtype, trailing_tokens=1)
    cache = b.kv_cache.clone()
    if tiles is None:
        attn = TritonPagedAttention(max_model_len=256 * splits)
        attn.num_sms = 1 << 20  # as if the batch were far too small to fill the GPU: splits follow the length
        b.meta.prepared = attn.prepare(b.meta)
        out = attn.forward(b.query, b.key, b.value, cache, b.meta, SCALE)
        assert (out[-1] == 0).all(), "the token owned by no sequence must come out zero"
    else:
        write_kv(b.key, b.value, cache, b.meta.slot_mapping)
        out = decode_attention(b.query, cache, b.meta, SCALE, splits, tiles, poisoned_like(b.query), split_tokens=16)
        assert out[-1].isnan().all(), "the token owned by no sequence must be left alone"
        out[-1] = 0
    kc.verify_attention("decode", b, out, cache, SCALE)
    assert (out[b.rows(padding=True)] == 0).all(), "padding sequences must come out zero"


def test_decode_splits_follow_max_model_len():
    assert [decode_splits(n) for n in (1, 256, 257, 1024, 3000, 1 << 20)] == [1, 1, 2, 4, 16, 16]


def test_decode_splits_stop_once_the_batch_fills_the_gpu():
    assert decode_splits(8192, programs=8, num_sms=132) == 16  # one sequence: split as far as the length allows
    assert decode_splits(8192, programs=64, num_sms=132) == 8
    assert decode_splits(8192, programs=2048, num_sms=132) == 1  # 256 sequences x 8 KV heads


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("specs", [MIXED, DECODE[:-1]], ids=["mixed", "decode"])
def test_matches_torch_paged_attention(specs, dtype):
    """Same cache and outputs as the CPU backend (whose decode path needs one token per sequence)."""
    b = batch(specs, group=3, head_dim=32, dtype=dtype, poison=0.0)
    triton_attn, torch_attn = TritonPagedAttention(max_model_len=64), TorchPagedAttention()
    triton_cache, torch_cache = b.kv_cache.clone(), kc.head_major(b.kv_cache)
    b.meta.prepared = triton_attn.prepare(b.meta)
    out = triton_attn.forward(b.query, b.key, b.value, triton_cache, b.meta, SCALE)
    torch_meta = dataclasses.replace(b.meta, prepared=torch_attn.prepare(b.meta))
    ref = torch_attn.forward(b.query, b.key, b.value, torch_cache, torch_meta, SCALE)
    kc.assert_same_bits("kv cache", triton_cache, torch_cache.transpose(2, 3))
    real = b.rows(padding=False)
    kc.verify_close("vs TorchPagedAttention", out[real], ref[real], kc.tolerance(dtype))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_ops_match_reference(dtype):
    inputs = kc.make_op_inputs(
        tokens=5, hidden=96, inter=80, num_heads=4, num_kv_heads=2, head_dim=32, dtype=dtype, device="cpu"
    )
    errors = kc.check_ops(inputs)
    assert set(errors) == {"rms_norm", "add_rms_norm", "add_rms_norm residual", "rotary", "silu_and_mul"}


@interpreted
def test_layer_ops_accept_strided_rows():
    """Rows of a wider buffer (as after a fused projection) and a bf16 input with an fp32 weight."""
    inputs = kc.make_op_inputs(
        tokens=3, hidden=64, inter=48, num_heads=2, num_kv_heads=1, head_dim=16, dtype=torch.bfloat16, device="cpu"
    )
    wide = torch.randn(3, 200).to(torch.bfloat16)
    strided = dataclasses.replace(
        inputs, x=wide[:, :64], residual=wide[:, 64:128], gate_up=wide[:, 100:196], weight=inputs.weight.float()
    )
    kc.check_ops(strided)
