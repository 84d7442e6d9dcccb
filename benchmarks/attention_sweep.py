"""Decode and prefill attention against the GPU's ceilings, measured in the same process: the copy bandwidth
(device to device, bytes read + written) and the bf16 matmul rate (8192^3), then every tile shape, launch
order and split count of the Triton kernels on the serving shapes (1B: 32 heads / 8 KV heads x 64; 8B:
32 / 8 x 128), each timed with triton.testing.do_bench (median).

Small decode batches are timed replayed from a CUDA graph, as the engine runs them. Decode is reported as
K/V bytes read per second against the copy ceiling, prefill as attention TFLOP/s
against the matmul ceiling. The sweep goes in stages, each keeping the best of the last: the launch
order at the default tiles, then the tiles, then the split counts (decode). Every first launch of a
variant is checked against the dense float64 reference.

    python benchmarks/attention_sweep.py --out OUTDIR [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
import triton.testing

from kernel_check import dense_reference, make_paged_batch, tolerance, verify_close
from paged.backends.cuda.kernels.attention import (
    TileConfig,
    TritonPagedAttention,
    decode_attention,
    decode_config,
    prefill_attention,
    prefill_config,
    write_kv,
)

DECODE_CASES = {  # name: (sequences as (new tokens, context), head_dim)
    "w1-1b": ([(1, 640)] * 256, 64),
    "long-1b": ([(1, 8192)] * 64, 64),
    "single-1b": ([(1, 1024)], 64),
    "w1-8b": ([(1, 640)] * 256, 128),
    "long-8b": ([(1, 8192)] * 64, 128),
    "single-8b": ([(1, 1024)], 128),
}
PREFILL_CASES = {  # a step of 8,192 tokens as the scheduler cuts them
    "long-1b": ([(7680, 7680), (512, 512)], 64),
    "long-chunk-1b": ([(7168, 7680), (1024, 1024)], 64),
    "w1-1b": ([(512, 512)] * 16, 64),
    "long-8b": ([(7680, 7680), (512, 512)], 128),
    "w1-8b": ([(512, 512)] * 16, 128),
}


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def bench_graph(fn) -> float:
    """Milliseconds of fn replayed from a CUDA graph, as the engine runs decode: a small batch's kernels take
    less time than launching them from Python."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def ceilings() -> dict[str, float]:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    a, b = torch.randn(2, 8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ b)
    return {"copy_tbps": 2 * src.numel() / copy_ms / 1e9, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def make_batch(specs, head_dim: int):
    """A step with its K/V already written (NaN in every other slot), and a check of an output against the
    float64 reference, computed once."""
    batch = make_paged_batch(specs, num_kv_heads=8, group=4, head_dim=head_dim, dtype=torch.bfloat16, device="cuda")
    write_kv(batch.key, batch.value, batch.kv_cache, batch.meta.slot_mapping)
    real = batch.rows(padding=False)
    ref = dense_reference(batch, head_dim**-0.5)[real]

    def check(name: str, out: torch.Tensor) -> None:
        verify_close(name, out[real], ref, tolerance(batch.query.dtype))

    return batch, check


def tile_grid(quick: bool, prefill: bool) -> list[TileConfig]:
    if prefill:
        shapes = itertools.product((64, 128) if quick else (64, 128, 256), (32, 64, 128), (4, 8), (2, 3))
    else:
        shapes = itertools.product((16,), (32, 64, 128), (2, 4, 8), (2, 3) if quick else (2, 3, 4))
    return [TileConfig(*shape) for shape in shapes]


def sweep_decode(name, specs, head_dim, ceiling, quick, rows):
    batch, check = make_batch(specs, head_dim)
    scale = head_dim**-0.5
    kv_bytes = sum(2 * s for _, s in specs) * 8 * head_dim * 2
    splits, split_tokens = TritonPagedAttention(8192).split_plan(len(specs) * 8, None, batch.query.device)
    checked = set()

    def run(config, n, tokens):
        fn = lambda: decode_attention(batch.query, batch.kv_cache, batch.meta, scale, n, config,  # noqa: E731
                                      split_tokens=tokens)
        key = (config, n, tokens)
        if key not in checked:
            check(f"decode {name} {key}", fn())
            checked.add(key)
        ms = (bench_graph if len(specs) < 8 else bench)(fn)
        row = dict(kind="decode", case=name, **dataclasses.asdict(config), splits=n, split_tokens=tokens, ms=ms,
                   tbps=kv_bytes / ms / 1e9, of_copy=kv_bytes / ms / 1e9 / ceiling)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return ms

    default = decode_config(head_dim)
    orders = {first: run(dataclasses.replace(default, heads_first=first), splits, split_tokens) for first in (False, True)}
    heads_first = min(orders, key=orders.get)
    tiles = {c: run(dataclasses.replace(c, heads_first=heads_first), splits, split_tokens)
             for c in tile_grid(quick, prefill=False)}
    best = dataclasses.replace(min(tiles, key=tiles.get), heads_first=heads_first)
    for n, tokens in itertools.product((1, 2, 4, 8, 16), (64, 256)):
        run(best, n, tokens)


def sweep_prefill(name, specs, head_dim, ceiling, quick, rows):
    batch, check = make_batch(specs, head_dim)
    scale = head_dim**-0.5
    flops = sum(4 * 32 * head_dim * (q * (s - q) + q * (q + 1) // 2) for q, s in specs)

    def run(config):
        fn = lambda: prefill_attention(batch.query, batch.kv_cache, batch.meta, scale, config)  # noqa: E731
        check(f"prefill {name} {config}", fn())
        ms = bench(fn)
        row = dict(kind="prefill", case=name, **dataclasses.asdict(config), ms=ms, tflops=flops / ms / 1e9,
                   of_matmul=flops / ms / 1e9 / ceiling)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return ms

    default = prefill_config(head_dim)
    orders = {first: run(dataclasses.replace(default, heads_first=first)) for first in (False, True)}
    heads_first = min(orders, key=orders.get)
    for config in tile_grid(quick, prefill=True):
        run(dataclasses.replace(config, heads_first=heads_first))


def summary(rows: list[dict], limits: dict[str, float]) -> str:
    lines = [f"ceilings: copy {limits['copy_tbps']:.2f} TB/s, bf16 matmul {limits['matmul_tflops']:.0f} TFLOP/s", ""]
    for kind, metric in (("decode", "tbps"), ("prefill", "tflops")):
        for case in dict.fromkeys(r["case"] for r in rows if r["kind"] == kind):
            mine = [r for r in rows if r["kind"] == kind and r["case"] == case]
            first, best = mine[0], max(mine, key=lambda r: r[metric])
            knobs = {k: best[k] for k in ("block_m", "block_n", "num_warps", "num_stages", "heads_first", "splits",
                                          "split_tokens") if k in best}
            lines.append(f"{kind} {case}: default {first[metric]:.3g}, best {best[metric]:.3g} {metric} "
                         f"({best['ms'] * 1e3:.1f} us) with {knobs}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer tile shapes")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    limits = ceilings()
    print(json.dumps(limits), flush=True)
    wanted = set(filter(None, args.cases.split(",")))
    rows: list[dict] = []
    for name, (specs, head_dim) in DECODE_CASES.items():
        if not wanted or f"decode-{name}" in wanted:
            sweep_decode(name, specs, head_dim, limits["copy_tbps"], args.quick, rows)
    for name, (specs, head_dim) in PREFILL_CASES.items():
        if not wanted or f"prefill-{name}" in wanted:
            sweep_prefill(name, specs, head_dim, limits["matmul_tflops"], args.quick, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_sweep.json").write_text(json.dumps({"ceilings": limits, "rows": rows}, indent=1))
    text = summary(rows, limits)
    (args.out / "attention_sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
