"""The Triton kernels of the CUDA backend, run on the CPU through the Triton interpreter.

Every kernel is checked against a float64 reference and its plain-torch counterpart on small random
shapes; the checks themselves live in benchmarks/kernel_check.py, which runs them at full size on a GPU.
Sliding windows and soft caps are checked against tests/backends/attention_cases.py's reference instead,
the one the conformance suite holds every backend to, blocks before the windows full of NaN among them.
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
from paged.backends.cuda.backend import CUDABackend  # noqa: E402
from paged.backends.cuda.kernels.attention import (  # noqa: E402
    TileConfig,
    TritonPagedAttention,
    decode_attention,
    decode_splits,
    prefill_attention,
    write_kv,
)
from tests.backends.attention_cases import Case, build_case, check, run_attention, tolerance  # noqa: E402


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
# The same, launched in the other order (sequences along grid axis 0): which program gets which (sequence,
# KV head) changes, nothing else may.
SEQS_FIRST = dataclasses.replace(SMALL_TILES, heads_first=False)
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
    (2, 32, torch.float32, SEQS_FIRST),
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
    (2, 32, torch.float32, 4, SEQS_FIRST),
    (2, 32, torch.float32, 1, SEQS_FIRST),
]


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("group,head_dim,dtype,splits,tiles", DECODE_CASES)
def test_decode_matches_dense_reference(group, head_dim, dtype, splits, tiles):
    """Default tiles through TritonPagedAttention (splits from max_model_len, shares of 256 tokens: only the
    300-token context spans two), every token owned by a sequence as the engine's are; small tiles with
    shares of 16 tokens, straight into a NaN-filled output, where a token owned by no sequence must stay
    untouched."""
    b = batch(DECODE, group, head_dim, dtype, trailing_tokens=0 if tiles is None else 1)
    cache = b.kv_cache.clone()
    if tiles is None:
        attn = TritonPagedAttention(max_model_len=256 * splits)
        attn.num_sms = 1 << 20  # as if the batch were far too small to fill the GPU: splits follow the length
        b.meta.prepared = attn.prepare(b.meta)
        out = attn.forward(b.query, b.key, b.value, cache, b.meta, SCALE)
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


# --- sliding windows and soft caps, against attention_cases' float64 reference ----------------------------


class HostCUDABackend(CUDABackend):
    """The CUDA backend as attention_cases.run_attention drives it, its kernels interpreted on the host, with
    SMALL_TILES: several query tiles (8 tokens of GQA 2) and key tiles per sequence, so that windows cut
    through the lower band, the unmasked keys and the causal band of the prefill kernel."""

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def attention(self, max_model_len: int) -> TritonPagedAttention:
        return TritonPagedAttention(max_model_len, lambda _: SMALL_TILES, lambda _: SMALL_TILES)


# (context lengths, query lengths) with pages of 8: prefill chunks over cached prefixes (60 with 25 new
# tokens spans four query tiles), a whole prompt and decode tokens in one step; then a decode-only step.
WINDOW_STEPS = {
    "mixed": ([30, 9, 17, 60, 3, 45], [4, 9, 1, 25, 1, 1]),
    "decode": ([1, 40, 7, 100, 9, 33], [1] * 6),
}
# (window, softcap, scale; None: head_dim**-0.5): a window of one key (each query sees itself), one
# shorter than a page, one longer than most contexts; a cap on its own (at scale 4, scores up to ~50 that
# the cap saturates) and with a window.
WINDOW_CASES = {
    "window1": (1, None, None),
    "window5": (5, None, None),
    "window40": (40, None, None),
    "cap1": (None, 1.0, None),
    "cap2-saturated": (None, 2.0, 4.0),
    "window12-cap1": (12, 1.0, None),
}


def window_case(kind: str, window: int | None, softcap: float | None) -> Case:
    case = build_case(*WINDOW_STEPS[kind], 4, 2, block_size=8)
    case.window, case.softcap = window, softcap
    return case


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("window,softcap,scale", WINDOW_CASES.values(), ids=WINDOW_CASES.keys())
@pytest.mark.parametrize("kind", WINDOW_STEPS)
def test_window_and_softcap_match_dense_reference(kind, window, softcap, scale):
    """Through TritonPagedAttention.forward: the prefill kernel for the mixed step, the decode kernel (one
    split: max_model_len is the longest context) for the other."""
    case = window_case(kind, window, softcap)
    case.scale = scale or case.scale
    check(case, *run_attention(case, HostCUDABackend()), tolerance(torch.float32))


def poison_blocks_before_windows(case: Case) -> int:
    """NaN in every block that lies wholly before the window of its sequence's first new token: blocks the
    block manager may have handed to another sequence. Returns how many."""
    poisoned = 0
    block_size = case.meta.block_size
    for table, (k, _), query_len in zip(case.tables, case.full_kv, case.meta.query_start_loc.diff().tolist()):
        first_seen = k.shape[0] - query_len - case.window + 1
        for index, block in enumerate(table):
            if (index + 1) * block_size <= first_seen:
                case.cache[:, block] = float("nan")
                poisoned += 1
    return poisoned


# (step, window, softcap, tiles): small tiles and the defaults (64-key tiles: 8 pages each), GQA 3.
POISON_STEPS = {
    "mixed": ([70, 30, 100, 12, 50], [20, 1, 1, 12, 7]),
    "decode": ([70, 30, 100, 12, 1], [1] * 5),
}
POISON_CASES = [("mixed", 9, None, SMALL_TILES), ("mixed", 20, 1.0, None),
                ("decode", 9, 1.0, SMALL_TILES), ("decode", 20, None, None)]


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("kind,window,softcap,tiles", POISON_CASES)
def test_blocks_before_the_window_are_never_read(kind, window, softcap, tiles):
    """Blocks before every window full of NaN, which any read would carry into the output (a NaN value
    times a zero weight is NaN): the output must still be the reference's. Decode takes 4 splits of
    16-token shares, so a window of 20 spans two and the shares start at the window, not at 0."""
    case = build_case(*POISON_STEPS[kind], 6, 2, block_size=8)
    case.window, case.softcap = window, softcap
    assert poison_blocks_before_windows(case) >= 10
    cache = case.cache.clone()
    write_kv(case.key, case.value, cache, case.meta.slot_mapping)
    if kind == "decode":
        out = decode_attention(case.query, cache, case.meta, case.scale, 4, tiles, split_tokens=16,
                               window=window, softcap=softcap)
    else:
        out = prefill_attention(case.query, cache, case.meta, case.scale, tiles, window=window, softcap=softcap)
    ref = case.reference()
    assert torch.isfinite(out).all()
    kc.verify_close(f"{kind} over poisoned blocks", out, ref, tolerance(torch.float32))


FP8 = torch.float8_e4m3fn


@interpreted
@data_dependent_loops
@pytest.mark.parametrize("softcap", [None, 1.0])
@pytest.mark.parametrize("kind", WINDOW_STEPS)
def test_window_over_fp8_cache(kind, softcap):
    """An e4m3 cache with k_scale 0.05 (it stores keys 20 times the true ones) and v_scale 3, a window of 7:
    the cap must apply to the true scores, k_scale inside the tanh. The reference attends over what the
    cache represents (its values times the scales), the check compares the written cache as such too."""
    case = window_case(kind, 7, softcap)
    kv_scale = torch.tensor([0.05, 3.0])
    cache = torch.stack([kc.quantize_fp8(case.cache[part], kv_scale[part], FP8) for part in range(2)])
    case.full_kv = [tuple(kc.quantize_fp8(x, kv_scale[part], FP8).float() * kv_scale[part]
                          for part, x in enumerate(kv)) for kv in case.full_kv]
    attention = HostCUDABackend().attention(case.meta.max_seq_len)
    case.meta.prepared = attention.prepare(case.meta)
    out = attention.forward(case.query, case.key, case.value, cache, case.meta, case.scale, kv_scale,
                            window=case.window, softcap=case.softcap)
    represented = torch.stack([cache[part].float() * kv_scale[part] for part in range(2)])
    check(case, out, represented, tolerance(torch.float32))


def test_window_and_softcap_are_checked():
    """Before any launch: a window is a positive integer, a cap positive and finite."""
    b = batch([(1, 5)], group=1, head_dim=16, dtype=torch.float32)
    bad_args = [({"window": 0}, "window"), ({"window": 2.5}, "window"), ({"window": True}, "window"),
                ({"softcap": 0.0}, "softcap"), ({"softcap": -1.0}, "softcap"), ({"softcap": float("inf")}, "softcap")]
    for bad, name in bad_args:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            decode_attention(b.query, b.kv_cache, b.meta, SCALE, 1, **bad)
        with pytest.raises(ValueError, match=f"^{name} must be"):
            prefill_attention(b.query, b.kv_cache, b.meta, SCALE, **bad)
