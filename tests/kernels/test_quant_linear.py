"""int_linear (paged.backends.cuda.kernels.quant_linear) on the CPU through the Triton interpreter, against a
float64 reference computed from the codes, scales and zeros/offsets themselves.

Every case draws fresh shapes: odd N and odd K, so K is never a multiple of the group and a row's last
word is part padding. The seed is printed, so a failure can be replayed. float32 inputs are checked
tightly; 16-bit ones loosely, the more so as the interpreter rounds float32 to bfloat16 by truncation.

Under the interpreter: see tests/kernels/interpreter.py, imported first.
"""

from tests.kernels.interpreter import INTERPRETED, compiled_process, run_in_fresh_process

import dataclasses  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from paged.backends.cuda.kernels.quant_linear import (  # noqa: E402
    PackedIntWeight,
    int_linear,
    pack_int_weight,
    plan_linear,
)
from paged.quant.matrix import QuantizedMatrix  # noqa: E402


@triton.jit
def _count_to(out_ptr, n):
    """A loop whose bound is a kernel argument, like every K loop of the kernels under test."""
    count = 0
    for _ in range(0, n):
        count += 1
    tl.store(out_ptr, count)


def _interpreter_runs_loop_bounds() -> bool:
    """Some triton releases (3.6 among them) turn loop bounds into numbers with int() on a one-element
    array, which numpy >= 2.4 rejects; compiled kernels are not affected."""
    try:
        _count_to[(1,)](torch.zeros(1, dtype=torch.int32), 3)
    except Exception:  # an InterpreterError wrapping the TypeError
        return False
    return True


def _skip_reason() -> str | None:
    if not INTERPRETED:
        return "triton was imported first: see test_in_fresh_process"
    if not _interpreter_runs_loop_bounds():
        return "this triton's interpreter cannot run loops bounded by arguments under this numpy"
    return None


SKIP_REASON = _skip_reason()
interpreted = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1.5e-2}


@compiled_process
def test_in_fresh_process():
    run_in_fresh_process(__file__)


@pytest.fixture(autouse=True)
def seed() -> int:
    value = random.randrange(2**31)
    print(f"seed={value}")  # shown by pytest when the test fails
    torch.manual_seed(value)
    return value


@dataclasses.dataclass(frozen=True)
class Case:
    bits: int
    group: int | None  # None: one group per row
    form: str  # "zeros", "fractional" (non-integer zeros) or "offsets"
    scale_dtype: torch.dtype
    m: int
    x_dtype: torch.dtype
    act_order: bool = False
    bias: bool = False


f16, f32, bf16 = torch.float16, torch.float32, torch.bfloat16
# M <= 2 runs the GEMV, up to 16 the narrow GEMM, above it the dequantized matrix through a dense product.
CASES = [
    Case(4, 32, "zeros", f16, 1, f32),
    Case(4, 128, "zeros", f32, 1, bf16, act_order=True),
    Case(8, 16, "offsets", f32, 3, f32, bias=True),
    Case(4, 64, "offsets", f16, 4, bf16, bias=True),
    Case(8, 128, "fractional", f16, 2, f32, act_order=True),
    Case(4, None, "zeros", f16, 2, f32),
    Case(4, 16, "zeros", f32, 13, f32, bias=True),
    Case(8, 64, "zeros", f16, 17, f16),
    Case(8, 32, "offsets", f16, 40, bf16),
    Case(4, 48, "zeros", f32, 33, f32),
    Case(4, 128, "zeros", f16, 9, bf16, act_order=True, bias=True),
    Case(4, 128, "offsets", f32, 70, f32, act_order=True),
    Case(8, 64, "offsets", f32, 100, bf16),
    Case(4, 32, "fractional", f16, 130, bf16, bias=True),
]


def odd(low: int, high: int) -> int:
    return int(torch.randint(low, high, ())) | 1


def random_matrix(case: Case, n: int, k: int) -> QuantizedMatrix:
    group = case.group or k
    shape = (n, -(-k // group))
    levels = 2**case.bits
    codes = torch.randint(0, levels, (n, k), dtype=torch.uint8)
    scales = (torch.rand(shape) * 0.05 + 0.01).to(case.scale_dtype)
    if case.form == "offsets":
        affine = {"offsets": -levels / 2 * scales.float() + 0.01 * torch.randn(shape)}
    elif case.form == "fractional":
        affine = {"zeros": torch.rand(shape) * (levels - 1)}
    else:
        affine = {"zeros": torch.randint(0, levels, shape).to(case.scale_dtype)}
    perm = torch.randperm(k) if case.act_order else None
    return QuantizedMatrix(codes, scales, case.bits, group, perm=perm, **affine)


def reference(matrix: QuantizedMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias in float64, W from the matrix's own fields (dequantize() rounds through float32)."""
    groups = torch.arange(matrix.shape[1]) // matrix.group_size
    codes, scales = matrix.codes.double(), matrix.scales.double()[:, groups]
    if matrix.zeros is not None:
        w = (codes - matrix.zeros.double()[:, groups]) * scales
    else:
        w = codes * scales + matrix.offsets.double()[:, groups]
    if matrix.perm is not None:
        w = torch.empty_like(w).index_copy_(1, matrix.perm, w)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def check(case: Case, n: int, k: int, plan_split: int | None = None) -> None:
    matrix = random_matrix(case, n, k)
    weight = pack_int_weight(matrix, CPU)
    x = torch.randn(case.m, k).to(case.x_dtype)
    bias = torch.randn(n).to(case.x_dtype) if case.bias else None
    plan = None
    if plan_split is not None and plan_linear(case.m, weight, case.x_dtype, 4).kernel != "dense":
        plan = plan_linear(case.m, weight, case.x_dtype, 4)
        # Short K tiles, so that K holds several of them and the last split gets fewer.
        block_k = {"gemv": 64, "narrow": 16 * weight.codes_per_word}[plan.kernel]
        plan = dataclasses.replace(plan, split_k=plan_split, block_k=block_k)
    y = int_linear(x, weight, bias, plan=plan)
    assert y.shape == (case.m, n) and y.dtype == case.x_dtype
    err = relative_error(y, reference(matrix, x, bias))
    assert err < TOLERANCE[case.x_dtype], f"{case} n={n} k={k}: relative error {err:.3g}"


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@interpreted
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case):
    check(case, odd(17, 200), odd(40, 300))


@interpreted
@pytest.mark.parametrize("m", [1, 3, 24, 80])
def test_split_k(m: int):
    check(Case(4, 32, "zeros", f16, m, f32, bias=True), odd(17, 60), odd(560, 640), plan_split=3)


@interpreted
def test_leading_dims_and_empty_input():
    matrix = random_matrix(Case(8, 32, "zeros", f16, 1, f32), 19, 75)
    weight = pack_int_weight(matrix, CPU)
    x = torch.randn(2, 3, 75)
    y = int_linear(x, weight)
    assert y.shape == (2, 3, 19)
    assert relative_error(y.reshape(6, 19), reference(matrix, x.reshape(6, 75), None)) < TOLERANCE[f32]
    assert int_linear(x[:0], weight).shape == (0, 3, 19)


def test_packing_is_compact():
    """Packed codes (rows padded to 16 words) and float16 side tensors exactly where they are lossless."""
    matrix = random_matrix(Case(4, 32, "zeros", f16, 1, f32), 33, 301)
    weight = pack_int_weight(matrix, CPU)
    assert weight.qweight.dtype == torch.int32 and weight.qweight.shape == (33, 48)
    assert weight.scales.dtype == torch.float16 and weight.zeros.dtype == torch.float16
    assert weight.nbytes == 33 * 48 * 4 + 2 * 33 * 10 * 2
    offsets = pack_int_weight(random_matrix(Case(8, 16, "offsets", f32, 1, f32), 5, 50), CPU)
    assert offsets.zeros is None and offsets.offsets.dtype == torch.float32
    assert offsets.scales.dtype == torch.float32
    fractional = pack_int_weight(random_matrix(Case(8, 16, "fractional", f16, 1, f32), 5, 50), CPU)
    assert fractional.offsets is None and fractional.zeros.dtype == torch.float32


@pytest.mark.parametrize("m", [1, 4, 5, 16, 64, 256, 2048])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1024, 4096), (57344, 8192)])
def test_gpu_plans_meet_compile_constraints(m: int, n: int, k: int):
    """Plans for serving shapes on 132 SMs: power-of-two blocks, tl.dot tiles of at least 16 inside a group,
    and split K only where outputs alone leave SMs idle."""
    empty = torch.empty(0)
    weight = PackedIntWeight(empty, empty, bits=4, group_size=128, n=n, k=k, zeros=empty)
    plan = plan_linear(m, weight, torch.bfloat16, 132)
    assert plan.kernel == ("gemv" if m <= 2 else "narrow" if m <= 16 else "dense")
    if plan.kernel == "dense":
        return
    for block in (plan.block_m, plan.block_n, plan.block_k):
        assert block & (block - 1) == 0
    if plan.kernel != "gemv":
        assert min(plan.block_m, plan.block_n, plan.block_k) >= 16 and plan.block_k <= 128
    programs = -(-m // plan.block_m) * -(-n // plan.block_n)
    assert plan.split_k == 1 or programs < 132
