"""The CUDA backend's FP8/INT8 kernels in the Triton interpreter: the per-token activation quantization of W8A8,
against the plain-torch version the CPU backend uses (quantize_per_token), bit for bit.

The interpreter's own float32 -> float8 conversion is wrong in triton 3.6 (31.5 becomes 16), so for FP8
only the scales are compared here; tests/test_gpu.py compares the FP8 values on a GPU."""

from tests.kernels.interpreter import compiled_process, interpreted, run_in_fresh_process

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from paged.backends.common.quant_linear import quantize_per_token  # noqa: E402
from paged.backends.cuda.kernels.quant_activation import quantize_rows  # noqa: E402

@compiled_process
def test_in_fresh_process():
    run_in_fresh_process(__file__)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("static", [False, True])
def test_matches_torch(dtype, static):
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    rows, cols = random.randint(1, 9), random.choice([7, 1000, 1024, 2500, 40000])
    x = (torch.randn(rows, cols) * torch.rand(rows, 1) * 30).to(torch.bfloat16)
    x[0, 0] = 0  # a row may be all but zero; a whole zero row must not divide by zero
    if rows > 1:
        x[1] = 0
    scale_in = torch.tensor(0.07) if static else None
    q, scale = quantize_rows(x, dtype, scale_in)
    q_ref, scale_ref = quantize_per_token(x, dtype, scale_in)
    assert torch.equal(scale, scale_ref)
    if dtype == torch.int8:
        assert torch.equal(q, q_ref)


@interpreted
@pytest.mark.parametrize("m", [1, 2])
def test_fp8_gemv_matches_float64(m):
    """The decode GEMV from FP8 weights: exactly the widened weights' product, up to float32 summation."""
    from paged.backends.cuda.kernels.fp8_linear import fp8_gemv

    seed = random.randrange(2**31)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    n, k = random.choice([(37, 1000), (16, 512), (100, 1300)])
    weight = (torch.randn(n, k) * 40).to(torch.float8_e4m3fn)
    scale, bias = torch.rand(n) / 100, torch.randn(n)
    x = torch.randn(m, k)
    expected = x.double() @ (weight.double() * scale.double()[:, None]).T + bias.double()
    got = fp8_gemv(x, weight, scale, bias)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5
