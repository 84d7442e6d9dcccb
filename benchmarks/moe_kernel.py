"""The CUDA backend's fused MoE kernel at the layer shapes of Mixtral-8x7B and Qwen3-30B-A3B, on a GPU:
checked against a float64 per-expert loop, and timed against the plain-torch op (models.ops.fused_moe, one
GEMM per expert that got tokens) on the same inputs, one JSON line per case.

    python benchmarks/moe_kernel.py [--out DIR]

Decode-sized calls are bound by the bytes of the experts they touch (reported as GB/s over those bytes),
prefill-sized ones by their FLOPs (TFLOP/s over 2 * 3 * H * I per routed token).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from paged.backends.cuda.kernels.fused_moe import fused_moe
from paged.models.ops import fused_moe as torch_fused_moe

SHAPES = {  # hidden, expert intermediate, experts, top-k
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}


def reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """float64, expert by expert, token by token slot: independent of both ops' grouping."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for slot in range(ids.shape[1]):
        for expert in ids[:, slot].unique().tolist():
            rows = (ids[:, slot] == expert).nonzero().flatten()
            h = x[rows] @ w13[expert].T
            act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            out[rows] += (act @ w2[expert].T) * weights[rows, slot, None].double()
    return out


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def case(shape: str, tokens: int, generator: torch.Generator) -> dict:
    hidden, inter, experts, top_k = SHAPES[shape]
    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, generator=generator).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=dev, generator=generator) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=dev, generator=generator) * inter**-0.5).to(dtype)
    logits = torch.randn(tokens, experts, device=dev, generator=generator)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, -1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    ours = fused_moe(x, w13, w2, weights, ids)
    line = dict(shape=shape, tokens=tokens, experts_hit=int(ids.unique().numel()))
    if tokens <= 512:  # the float64 loop is slow on large batches
        ref = reference(x, w13, w2, weights, ids)
        line["rel_err_triton"] = float((ours.double() - ref).norm() / ref.norm())
        line["rel_err_torch"] = float((torch_fused_moe(x, w13, w2, weights, ids).double() - ref).norm() / ref.norm())
    t_triton = timed(lambda: fused_moe(x, w13, w2, weights, ids))
    t_torch = timed(lambda: torch_fused_moe(x, w13, w2, weights, ids))
    touched = line["experts_hit"] * 3 * hidden * inter * 2
    flops = 2 * 3 * hidden * inter * tokens * top_k
    line.update(triton_us=round(t_triton * 1e6, 1), torch_us=round(t_torch * 1e6, 1),
                speedup=round(t_torch / t_triton, 2), triton_gb_s=round(touched / t_triton / 1e9),
                triton_tflop_s=round(flops / t_triton / 1e12, 1))
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    generator = torch.Generator(device="cuda").manual_seed(0)
    block = torch.empty(2**31, dtype=torch.uint8, device="cuda")  # the ceiling the GB/s figures compare with
    lines = [dict(what="copy_bandwidth_TBps", value=round(2 * block.numel() / timed(block.clone) / 1e12, 2))]
    del block
    print(json.dumps(lines[0]), flush=True)
    for shape in SHAPES:
        for tokens in (1, 8, 64, 256, 2048, 8192):
            line = case(shape, tokens, generator)
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        (args.out / "moe-kernel.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
