"""Offline throughput of paged on one workload, printed as one JSON line.

    python benchmarks/throughput.py --num-prompts 32 --input-len 128 --output-len 128 --dtype bfloat16
    python benchmarks/throughput.py --shape 1b --load-format dummy --num-prompts 256 --input-len 512 --output-len 256
    python benchmarks/throughput.py --shape 1b --ranged 100,1024 --num-prompts 256

Prompts are random token ids (torch.Generator seeded), output lengths fixed or uniform in a range,
greedy, EOS ignored: every engine generates exactly the same number of tokens. With --compare-hf
(the default on a CPU) transformers' generate runs the same workload in the same process, so the
ratio is measured side by side, in its fastest dtype here (on a CPU float32 and bfloat16 are both tried
on a short run). Throughput = generated tokens / wall time of one generate call,
after an untimed warm-up. With --rounds N each engine runs the workload N times, taking turns, and the
median run and the median of the per-round ratios are reported.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B, as the peers' scripts build them
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192),
}
# Mixture-of-experts shapes, as their configs on the Hub have them: Mixtral-8x7B (46.7B parameters, 12.9B active
# per token) and Qwen3-30B-A3B (30.5B, 3.3B active).
MOE_SHAPES = {
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        tie_word_embeddings=False, use_sliding_window=False)),
}
# Checkpoint quantization configs a shape can carry, as AutoAWQ and AutoGPTQ write them (random weights in
# their layout come from --load-format dummy); "fp8" needs none: --quantization fp8 quantizes at load.
CHECKPOINT_QUANTIZATION = {
    "awq": dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemm"),
    "gptq": dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq"),
}


def shape_folder(shape: str, quantization: str | None = None) -> str:
    """A folder with only the config.json of a shape (weights come from --load-format dummy)."""
    import transformers

    stored = quantization if quantization in CHECKPOINT_QUANTIZATION else None
    folder = os.path.join(tempfile.gettempdir(), f"paged-shape-{shape}" + (f"-{stored}" if stored else ""))
    config_class, architecture, fields = MOE_SHAPES.get(shape) or (
        "LlamaConfig", "LlamaForCausalLM", dict(SHAPES[shape], rope_theta=500000.0))
    config = getattr(transformers, config_class)(**fields, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    config.architectures = [architecture]
    if stored:
        config.quantization_config = CHECKPOINT_QUANTIZATION[stored]
    config.save_pretrained(folder)
    return folder


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts and output lengths; the same seed gives every engine the same requests."""
    g = torch.Generator().manual_seed(args.seed)
    if args.ranged:
        lo, hi = (int(v) for v in args.ranged.split(","))
        rnd = random.Random(args.seed)
        lens = [(rnd.randint(lo, hi), rnd.randint(lo, hi)) for _ in range(args.num_prompts)]
        prompts = [torch.randint(0, vocab_size, (i,), generator=g).tolist() for i, _ in lens]
        return prompts, [o for _, o in lens]
    prompts = torch.randint(0, vocab_size, (args.num_prompts, args.input_len), generator=g).tolist()
    return prompts, [args.output_len] * args.num_prompts


def run_paged(args, model: str | None) -> tuple[dict, Callable[[], dict], list[list[int]], list[int]]:
    """Start the engine and warm it up: (facts, a function timing one run of the workload, prompts, lengths)."""
    from paged import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              skip_tokenizer_init=args.load_format == "dummy", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size)
    first = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), use_tqdm=False)
    startup = time.perf_counter() - _PROCESS_START
    init = time.perf_counter() - t
    assert first[0].outputs[0].token_ids
    vocab = llm.engine.vocab_size
    prompts, out_lens = workload(args, vocab)
    warm = [{"prompt_token_ids": [(t * 7 + 3) % vocab for t in p[: args.input_len or 64]]} for p in prompts[:8]]
    llm.generate(warm, SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False) for o in out_lens]
    batch = [{"prompt_token_ids": p} for p in prompts]

    def timed() -> dict:
        # Every round runs the same prompts: without this, rounds after the first would find them all in
        # the prefix cache and skip their prefill, which the peer cannot.
        llm.engine.block_manager.reset_prefix_cache()
        llm.engine.backend.synchronize()
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - t
        return rates(wall, sum(len(o.outputs[0].token_ids) for o in outs), sum(map(len, prompts)))

    if args.profile:
        profile_steps(llm, batch, out_lens, args.profile)
    info = dict(engine="paged", backend=llm.engine.backend.name, device_name=llm.engine.backend.device_name(),
                dtype=str(llm.engine.precision), compute_dtype=str(llm.engine.dtype).removeprefix("torch."),
                weights=llm.engine.model.weight_storage, weight_gib=round(llm.engine.model.weight_bytes / 2**30, 2),
                quantization=llm.engine.model.quantization,
                kv_cache_dtype=str(llm.engine.core.kv_dtype).removeprefix("torch."),
                init_s=round(init, 2),
                startup_to_first_token_s=round(startup, 2), num_blocks=llm.engine.num_blocks)
    return info, timed, prompts, out_lens


def profile_steps(llm, batch, out_lens, path: str) -> None:
    """Where a step's milliseconds go: the engine's phases (schedule / execute / apply) on the host and
    every kernel on the device, over the same workload cut to 32 output tokens."""
    from torch.profiler import ProfilerActivity, profile

    from paged import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=min(o, 32), ignore_eos=True, detokenize=False)
              for o in out_lens]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - t
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"wall {wall:.3f}s for {len(batch)} requests x {params[0].max_tokens} tokens\n\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))


def run_hf(args, model_path: str | None, prompts, out_lens, dtypes: list[torch.dtype]
           ) -> tuple[dict, Callable[[], dict]]:
    """transformers' generate on the same prompts, batched as one static batch (all lengths equal), in the
    fastest of `dtypes` on this machine (a short run of each decides): (facts, a function timing one run)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    kwargs = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    if args.ranged:
        raise SystemExit("--compare-hf needs fixed lengths")

    def generate(model, batch, n_out):
        ids = torch.tensor(batch)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                                 min_new_tokens=n_out, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    models, trial = {}, {}
    for dtype in dtypes:
        models[dtype] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
        generate(models[dtype], [p[:16] for p in prompts[:2]], 4)
        t = time.perf_counter()
        generate(models[dtype], prompts, 8)
        trial[dtype] = time.perf_counter() - t
    best = min(trial, key=trial.get)
    model = models[best]

    def timed() -> dict:
        t = time.perf_counter()
        generated = generate(model, prompts, out_lens[0])
        return rates(time.perf_counter() - t, generated, sum(map(len, prompts)))

    import transformers

    return dict(engine="transformers-generate", version=transformers.__version__,
                dtype=str(best).removeprefix("torch."),
                trial_8_tokens_s={str(d).removeprefix("torch."): round(v, 2) for d, v in trial.items()}), timed


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput."""
    return sorted(runs, key=lambda r: r["output_tok_s"])[(len(runs) - 1) // 2]


def rates(wall: float, generated: int, prompt_tokens: int) -> dict:
    return dict(elapsed_s=round(wall, 3), generated_tokens=generated, output_tok_s=round(generated / wall, 1),
                total_tok_s=round((generated + prompt_tokens) / wall, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", choices=sorted({**SHAPES, **MOE_SHAPES}),
                    help="a model shape with random weights instead of --model")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--device")
    ap.add_argument("--quantization", help="fp8 (at load), or awq / gptq (a --shape's checkpoint config)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ranged", metavar="LO,HI", help="input and output lengths uniform in [LO, HI] per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, help="default: the backend's")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    ap.add_argument("--profile", metavar="FILE", help="also profile a cut-down run and write the tables here")
    ap.add_argument("--compare-hf", action=argparse.BooleanOptionalAction, default=None,
                    help="also time transformers' generate (default: on for the CPU)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the workload this many times, the engines taking turns; medians are reported")
    args = ap.parse_args()

    model = shape_folder(args.shape, args.quantization) if args.shape else args.model
    if args.shape:
        args.load_format = "dummy"
    if model is None:
        from paged.default_model import default_model_path

        model = default_model_path()
    info, paged_run, prompts, out_lens = run_paged(args, model)
    compare = args.compare_hf if args.compare_hf is not None else info["backend"] == "cpu"
    runs = {"paged": (info, paged_run)}
    if compare:
        peer = getattr(torch, info["compute_dtype"])
        dtypes = [torch.float32, torch.bfloat16] if info["backend"] == "cpu" else [peer]
        runs["transformers"] = run_hf(args, model, prompts, out_lens, dtypes)
    # Taking turns spreads the slow spells of a shared machine over both engines.
    rounds: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, run) in runs.items():
            rounds[name].append(run())
    line = dict(workload=dict(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                              ranged=args.ranged, seed=args.seed, shape=args.shape))
    for name, (facts, _) in runs.items():
        line[name] = dict(**facts, **median_run(rounds[name]))
        if args.rounds > 1:
            line[name]["rounds_output_tok_s"] = [r["output_tok_s"] for r in rounds[name]]
    if compare:
        ratios = [p["output_tok_s"] / h["output_tok_s"] for p, h in zip(rounds["paged"], rounds["transformers"])]
        line["ratio_vs_transformers"] = round(statistics.median(ratios), 2)
        if args.rounds > 1:
            line["rounds_ratio"] = [round(r, 2) for r in ratios]
    import transformers

    line["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__,
                            python=sys.version.split()[0])
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
