"""Turn benchmarks/gpu.sh's results.jsonl into the markdown table for RESULTS.md, with roofline fractions.

The roofline of a run: FLOPs (2 x matmul parameters per token, plus attention over the context) over
the measured bf16 matmul rate, and bytes (every weight once per step, the KV cache read by every decode
step) over the measured copy bandwidth; the larger is the floor, and floor / measured time is the
fraction reported. Both ceilings come from the same call (the peers' ceilings script).
"""

from __future__ import annotations

import json
import sys

SHAPES = {
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied=False),
}
PEERS = {  # vLLM 0.26 on the same H100 (../shared/peers/README.md)
    "w1-1b": 24056, "w1-8b": 9105, "single-1b": 481, "single-8b": 153, "w2-1b": 20103, "w2-8b": 8183,
}


def floor_seconds(shape: str, prompts: list[int], outputs: list[int], copy_bps: float, flops: float) -> float:
    s = SHAPES[shape]
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    per_layer = s["hidden"] * (s["hidden"] + 2 * kv) + s["hidden"] * s["hidden"] + 3 * s["hidden"] * s["inter"]
    matmul_params = s["layers"] * per_layer
    lm_head = s["vocab"] * s["hidden"]
    weight_bytes = 2 * (matmul_params + lm_head)
    kv_bytes_per_token = 2 * s["layers"] * 2 * kv
    tokens = sum(prompts) + sum(outputs)
    attn_flops = 0.0
    kv_read = 0.0
    for p, o in zip(prompts, outputs):
        attn_flops += 4 * s["layers"] * s["heads"] * head_dim * (p * p / 2 + o * (p + o / 2))
        kv_read += kv_bytes_per_token * o * (p + o / 2)
    total_flops = 2 * matmul_params * tokens + 2 * lm_head * sum(outputs) + attn_flops
    steps = max(outputs)  # a decode step per output position reads every weight once at least
    total_bytes = weight_bytes * steps + kv_read + kv_bytes_per_token * tokens
    return max(total_flops / flops, total_bytes / copy_bps)


def workload_lengths(w: dict) -> tuple[list[int], list[int]]:
    if w.get("ranged"):
        import random

        lo, hi = (int(v) for v in w["ranged"].split(","))
        rnd = random.Random(w["seed"])
        lens = [(rnd.randint(lo, hi), rnd.randint(lo, hi)) for _ in range(w["num_prompts"])]
        return [i for i, _ in lens], [o for _, o in lens]
    return [w["input_len"]] * w["num_prompts"], [w["output_len"]] * w["num_prompts"]


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    copy = next((r["value"] * 1e12 for r in rows if r.get("what") == "copy_bandwidth_TBps"), None)
    rate = next((r["value"] * 1e12 for r in rows if r.get("what") == "bf16_matmul_TFLOPs"), None)
    env = next((r for r in rows if r.get("what") == "env"), {})
    print(f"device: {env.get('gpu', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
          f"transformers {env.get('transformers', '?')}")
    if copy and rate:
        print(f"ceilings measured in the same call: copy {copy / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s\n")
    print("| run | paged output tok/s | vLLM 0.26 (peers) | paged / vLLM | roofline fraction | start-up to first token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "paged" not in r:
            continue
        p, w = r["paged"], r["workload"]
        fraction = "n/a"
        if copy and rate and w.get("shape") in SHAPES:
            prompts, outputs = workload_lengths(w)
            fraction = f"{floor_seconds(w['shape'], prompts, outputs, copy, rate) / p['elapsed_s']:.2f}"
        peer = PEERS.get(r["name"])
        ratio = f"{p['output_tok_s'] / peer:.2f}" if peer else ""
        print(f"| {r['name']} | {p['output_tok_s']:,.0f} | {peer or ''} | {ratio} | {fraction} | "
              f"{p['startup_to_first_token_s']} s |")
    for r in rows:
        if r.get("what") == "hf_generate_static" and "output_tok_s" in r:
            print(f"\ntransformers generate (batch {r['batch']}, {r['shape']}): {r['output_tok_s']:,.0f} output tok/s")
        if r.get("engine") == "hf-cb":
            print(f"\ntransformers generate_batch ({r['model_size']}): {r['output_tok_s']:,.0f} output tok/s")


if __name__ == "__main__":
    main(sys.argv[1])
