"""fused_moe (paged.backends.cuda.kernels.fused_moe) on the CPU through the Triton interpreter, against a
float64 loop over experts written here.

Shapes are small but cover the kernel's edges: H and I that are not multiples of any block (partial N and
K tiles), several K steps and column blocks, decode (T = 1) and prefill-sized T at each of the three
tile heights, experts that get no tokens, and one expert that gets every token (runs of several tiles). Inputs
are fresh random draws; the seed is printed, so a failure can be replayed.

Under the interpreter: see tests/kernels/interpreter.py, imported first.
"""

from tests.kernels.interpreter import INTERPRETED, compiled_process, run_in_fresh_process

import dataclasses  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from paged.backends.cuda.kernels.fused_moe import _sort_pairs, _tiles, fused_moe  # noqa: E402


@triton.jit
def _count_to(out_ptr, n):
    """A loop whose bound is a kernel argument, like the kernel's loop over K."""
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
# Relative error (norm of the difference over norm of the reference). bfloat16 is rounded where the
# plain-torch op rounds (gate, up, silu, the intermediate, the per-slot outputs), and the interpreter rounds
# float32 to bfloat16 by truncation, all towards zero: 1.5e-2 on average here, 4e-3 compiled on a GPU.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


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
    tokens: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    dtype: torch.dtype
    routing: str = "random"  # "random", "subset" (most experts get nothing) or "shared" (one expert, every token)


f32, bf16 = torch.float32, torch.bfloat16
CASES = [
    Case(1, 8, 2, 48, 40, f32),
    Case(7, 8, 2, 48, 40, f32),
    Case(150, 8, 2, 48, 40, f32),
    Case(1, 16, 4, 48, 40, bf16),
    Case(7, 16, 4, 48, 40, bf16),
    Case(150, 16, 4, 48, 40, bf16),
    Case(150, 16, 4, 48, 40, f32),
    Case(300, 8, 2, 48, 40, f32),  # 64 pairs an expert or more: the tallest tiles
    Case(7, 8, 2, 200, 136, f32),  # K steps and column blocks of both GEMMs, at each tile height
    Case(150, 8, 2, 200, 136, bf16),
    Case(300, 8, 2, 200, 136, bf16),
    Case(7, 16, 4, 48, 40, f32, routing="subset"),
    Case(150, 8, 2, 48, 40, bf16, routing="subset"),
    Case(150, 16, 4, 48, 40, f32, routing="shared"),
    Case(1, 8, 2, 48, 40, bf16, routing="shared"),
]


def route(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights float32 [T, k] summing to 1 per token, topk_ids [T, k] distinct per token)."""
    if case.routing == "subset":
        pool = torch.randperm(case.experts)[: case.top_k + 1]  # every other expert gets no tokens
    else:
        pool = torch.arange(case.experts)
    ids = torch.stack([pool[torch.randperm(len(pool))[: case.top_k]] for _ in range(case.tokens)])
    if case.routing == "shared":
        ids[:, 1:] = torch.where(ids[:, 1:] == 3, ids[:, :1], ids[:, 1:])  # keeps each token's ids distinct
        ids[:, 0] = 3
    weights = torch.rand(case.tokens, case.top_k) + 0.1
    return weights / weights.sum(1, keepdim=True), ids


def reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The mixture in float64, expert by expert over the (token, slot) pairs routed to it."""
    x, w13, w2, topk_weights = x.double(), w13.double(), w2.double(), topk_weights.double()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        h = x[tokens] @ w13[expert].T
        activated = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tokens, (activated @ w2[expert].T) * topk_weights[tokens, slots, None])
    return out


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@interpreted
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case):
    x = torch.randn(case.tokens, case.hidden).to(case.dtype)
    w13 = (torch.randn(case.experts, 2 * case.inter, case.hidden) / case.hidden**0.5).to(case.dtype)
    w2 = (torch.randn(case.experts, case.hidden, case.inter) / case.inter**0.5).to(case.dtype)
    topk_weights, topk_ids = route(case)
    y = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert y.shape == x.shape and y.dtype == case.dtype
    err = relative_error(y, reference(x, w13, w2, topk_weights, topk_ids))
    assert err < TOLERANCE[case.dtype], f"{case}: relative error {err:.3g}"


@interpreted
@pytest.mark.parametrize("case", [Case(7, 8, 2, 48, 40, f32), Case(150, 16, 4, 200, 136, bf16, routing="subset"),
                                  Case(300, 8, 2, 48, 40, bf16)], ids=str)
def test_fp8_experts_match_reference(case: Case):
    """Experts as float8 codes with a scale per (expert, row): against float64 over the values they encode."""
    x = torch.randn(case.tokens, case.hidden).to(case.dtype)
    dense13 = torch.randn(case.experts, 2 * case.inter, case.hidden) / case.hidden**0.5
    dense2 = torch.randn(case.experts, case.hidden, case.inter) / case.inter**0.5
    (w13, s13), (w2, s2) = (quantized(w) for w in (dense13, dense2))
    topk_weights, topk_ids = route(case)
    y = fused_moe(x, w13, w2, topk_weights, topk_ids, s13, s2)
    decoded13, decoded2 = (w.double() * s.double()[..., None] for w, s in ((w13, s13), (w2, s2)))
    err = relative_error(y, reference(x, decoded13, decoded2, topk_weights, topk_ids))
    assert err < TOLERANCE[case.dtype], f"{case}: relative error {err:.3g}"


def quantized(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn codes and float32 scales of each row of each expert."""
    scale = dense.abs().amax(-1) / torch.finfo(torch.float8_e4m3fn).max
    return (dense / scale[..., None]).to(torch.float8_e4m3fn), scale


def test_no_tokens():
    x = torch.randn(0, 48)
    y = fused_moe(x, torch.randn(8, 80, 48), torch.randn(8, 48, 40), torch.ones(0, 2), torch.zeros(0, 2).long())
    assert y.shape == (0, 48)


@pytest.mark.parametrize("tokens", [1, 7, 150])
def test_sorted_tiles_skip_unused_experts(tokens: int):
    """Every pair in exactly one row, each tile of one expert's pairs, no tile for an expert without pairs,
    and every tile past the used ones marked past the last expert."""
    experts, top_k = 16, 4
    block_m = _tiles(tokens * top_k, experts, torch.bfloat16).block_m
    pool = torch.tensor([2, 5, 6, 11, 13])
    topk_ids = torch.stack([pool[torch.randperm(len(pool))[:top_k]] for _ in range(tokens)])
    sorted_pairs, tile_experts = _sort_pairs(topk_ids, experts, block_m)
    pairs = tokens * top_k
    real = sorted_pairs[sorted_pairs < pairs].long()
    assert torch.equal(real.sort().values, torch.arange(pairs))
    counts = torch.bincount(topk_ids.flatten(), minlength=experts)
    used_tiles = -(-counts // block_m)
    assert torch.equal(tile_experts[: int(used_tiles.sum())].long(), torch.repeat_interleave(used_tiles))
    assert bool((tile_experts[int(used_tiles.sum()) :] == experts).all())
    rows = sorted_pairs.view(-1, block_m)[: int(used_tiles.sum())].long()
    row_experts = torch.where(rows < pairs, topk_ids.flatten()[rows.clamp(max=pairs - 1)], -1)
    assert bool(((row_experts == tile_experts[: len(rows), None]) | (row_experts == -1)).all())
