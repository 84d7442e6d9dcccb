"""What structured output costs: a batch of JSON-schema requests against the same batch unconstrained, and
time to first token with a schema never seen (its grammar compiles) and with a cached one. One JSON line.

    python benchmarks/structured.py --num-prompts 64 --rounds 3                       # CPU, the default model
    python benchmarks/structured.py --shape 1b --tokenizer .bench/smollm2-tokenizer   # GPU, random weights

Each round runs the constrained batch (greedy, up to --output-len tokens) and the same prompts
unconstrained with EOS ignored and each request's max_tokens set to the length its constrained twin
reached, so both runs generate exactly the same number of tokens in batches of the same sizes: the
difference is the grammar's (matchers advanced and masks filled on the host, masks applied on the device).
The two take turns going first, round by round, so a slow spell of a shared machine hits both.
A --shape has random weights and no tokenizer of its own: --tokenizer lends one (its vocabulary is
masked inside the shape's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from throughput import shape_folder  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "summary": {"type": "string", "maxLength": 240}},
    "required": ["title", "year", "tags", "summary"], "additionalProperties": False}
# The same fields with no bounds, as a plain pydantic model gives them: random weights then write strings until
# max_tokens (the JSON is cut off), but each step's matcher and mask work is what such a schema costs.
OPEN_SCHEMA = {**SCHEMA, "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                        "tags": {"type": "array", "items": {"type": "string"}},
                                        "summary": {"type": "string"}}}


def first_token_seconds(llm, prompt: list[int], params) -> float:
    """Time from queueing one request to its first generated token (the engine otherwise idle)."""
    engine = llm.engine
    start = time.perf_counter()
    request_id = engine.add_request(None, {"prompt_token_ids": prompt}, params)
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.outputs[0].token_ids:
                engine.abort_request(request_id)
                while engine.has_unfinished_requests():
                    engine.step()
                return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", help="a Llama shape of benchmarks/throughput.py, random weights")
    ap.add_argument("--tokenizer", help="tokenizer folder (needed with --shape)")
    ap.add_argument("--device")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="structured-outputs backend: auto, xgrammar, guidance")
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--schema", choices=["bounded", "open"], default="bounded",
                    help="bounded: string lengths, the year and the tag count bounded (outputs end); open: none")
    ap.add_argument("--profile", metavar="FILE", help="also write where the host's time goes (cProfile) in one "
                    "constrained and one unconstrained run")
    args = ap.parse_args()

    from paged import LLM, SamplingParams
    from paged.structured_output import StructuredOutputsParams

    model = shape_folder(args.shape) if args.shape else args.model
    llm = LLM(model=model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
              load_format="dummy" if args.shape else "auto", max_model_len=2048, kv_cache_memory=args.kv_cache_memory,
              structured_outputs_backend=args.backend)
    render = llm.engine.render_chat
    prompts = [render([{"role": "user", "content": f"Describe book number {i} as JSON: title, year, tags, summary."}])
               for i in range(args.num_prompts)]
    schema = SCHEMA if args.schema == "bounded" else OPEN_SCHEMA
    constrained = SamplingParams(temperature=0, max_tokens=args.output_len,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch[:4], constrained, use_tqdm=False)  # warm-up; the schema is compiled from here on

    lengths = [len(o.outputs[0].token_ids) for o in llm.generate(batch, constrained, use_tqdm=False)]
    free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]

    def timed(params) -> tuple[float, list]:
        llm.engine.block_manager.reset_prefix_cache()
        llm.engine.backend.synchronize()
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t, outs

    rounds = []
    for index in range(args.rounds):
        order = (constrained, free) if index % 2 == 0 else (free, constrained)
        times = {id(p): timed(p) for p in order}
        (constrained_s, outs), (free_s, _) = times[id(constrained)], times[id(free)]
        made = sum(len(o.outputs[0].token_ids) for o in outs)  # greedy on a GPU may drift from `lengths` a little
        rounds.append(dict(tokens=sum(lengths), constrained_tok_s=round(made / constrained_s, 1),
                           unconstrained_tok_s=round(sum(lengths) / free_s, 1),
                           valid_json=sum(_parses(o.outputs[0].text) for o in outs)))
    ratios = [r["constrained_tok_s"] / r["unconstrained_tok_s"] for r in rounds]
    if args.profile:
        profile_host(timed, {"constrained": constrained, "unconstrained": free}, args.profile)

    fresh = SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(
        json={**schema, "properties": {**schema["properties"], f"x{uuid.uuid4().hex[:8]}": {"type": "string"}}}))
    ttft = dict(fresh_schema_s=first_token_seconds(llm, prompts[0], fresh),
                cached_schema_s=first_token_seconds(llm, prompts[0], fresh),
                unconstrained_s=first_token_seconds(llm, prompts[0], SamplingParams(temperature=0, max_tokens=4)))
    import transformers
    from importlib.metadata import version

    print(json.dumps(dict(
        workload=dict(num_prompts=args.num_prompts, output_len=args.output_len, shape=args.shape,
                      model=args.model or ("default" if not args.shape else None), backend=args.backend,
                      schema=args.schema),
        backend=llm.engine.backend.name, device_name=llm.engine.backend.device_name(), dtype=str(llm.engine.dtype),
        rounds=rounds, median_ratio=round(statistics.median(ratios), 3),
        median_cost_pct=round(100 * (1 - statistics.median(ratios)), 1),
        ttft_ms={k: round(v * 1000, 1) for k, v in ttft.items()},
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, xgrammar=version("xgrammar"),
                      python=sys.version.split()[0]))), flush=True)


def profile_host(timed, runs: dict, path: str) -> None:
    """The functions the host spends its time in (own time), for each run: a grammar's matcher updates and mask
    fills hold the GIL or not, and add to the step or overlap the device's work."""
    import cProfile
    import io
    import pstats

    with open(path, "w") as f:
        for name, params in runs.items():
            profiler = cProfile.Profile()
            profiler.enable()
            seconds, _ = timed(params)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            f.write(f"== {name}: {seconds:.3f} s under the profiler\n{text.getvalue()}\n")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
