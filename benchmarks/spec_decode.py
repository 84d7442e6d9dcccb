"""Speculative decoding against none, in one process: output tokens per second and how many drafts were kept.

    python benchmarks/spec_decode.py --workload copy --streams 1,8                   # CPU, SmolLM2, real text
    python benchmarks/spec_decode.py --shape 1b --workload random --streams 1,64     # GPU, random weights

Workloads. `copy`: chat requests asking the model (a real one: the default SmolLM2) to repeat a paragraph, as a
summary or an edit repeats its source; greedy, ending at EOS, so every run produces the same tokens. `json-copy`:
the same held to a JSON schema ({"text": ...}), so drafts pass through the grammar and every checked position is
masked. `random`:
random prompt ids and `--output-len` tokens with EOS ignored, for a shape with random weights, which copies
nothing: its n-gram acceptance is whatever loops its greedy output falls into, so the run also checks drafts at
a set acceptance with an oracle (the baseline's own tokens, every `--oracle-miss`-th draft made wrong): the
speed of the mechanism at that acceptance, not a proposer's. Random weights give nearly flat logits, whose bf16
argmax differs between the decode and the verification kernels; `--sharpen F` scales the final norm so that
greedy tokens no longer depend on rounding (the oracle's drafts then match).

Methods (`--methods`): ngram (prompt lookup, k = --k), oracle, draft=PATH|SHAPE (a draft model; a shape name
gets random weights), self-draft (the target drafting for itself: every draft kept, at the draft's full cost).
Each configuration's engine runs alone (the previous one deleted), after an untimed warm-up; the baseline runs
first and last, and each ratio is against the mean of the two. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import SHAPES, shape_folder  # noqa: E402

PARAGRAPH = ("The city council met on Tuesday evening to review the budget for the new public library. After a "
             "long discussion, the members agreed to fund a larger children's section, to extend the opening hours "
             "on weekends, and to hire two more librarians before the summer. The proposal to build a small cafe "
             "near the entrance was postponed until next year because of rising construction costs, and the council "
             "asked the planning office to prepare a cheaper design.")
JSON_COPY = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 1200}}, "required": ["text"],
             "additionalProperties": False}
# A draft a seventh of the 1B shape: SmolLM2-135M's layers with Llama 3's vocabulary (180M parameters).
DRAFT_SHAPES = {"1b-draft": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=128256, tie_word_embeddings=True,
                                 max_position_embeddings=8192)}


class OracleProposer:
    """Drafts the baseline's own continuation, every `miss`-th draft token made wrong (0: none)."""

    writes_kv = False

    def __init__(self, sequences: list[tuple[list[int], list[int]]], miss: int, vocab: int) -> None:
        self.by_prompt = {tuple(prompt): full for prompt, full in sequences}  # prompt -> prompt + output
        self.miss, self.vocab = miss, vocab

    def propose_all(self, requests, limits):
        drafts = []
        for request, limit in zip(requests, limits):
            full, n = self.by_prompt[tuple(request.prompt_token_ids)], request.num_tokens
            draft = full[n : n + limit]
            drafts.append([(t + 1) % self.vocab if self.miss and (n + j) % self.miss == 0 else t
                           for j, t in enumerate(draft)])
        return drafts

    def release(self, request_id, keeps_cache):
        pass


def draft_folder(name: str) -> str:
    if name not in DRAFT_SHAPES:
        return name
    import transformers

    folder = os.path.join("/tmp", f"paged-shape-{name}")
    config = transformers.LlamaConfig(**DRAFT_SHAPES[name], rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                                      dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return folder


def requests(args, llm, streams: int):
    from paged import SamplingParams

    if args.workload in ("copy", "json-copy"):
        from paged.structured_output import StructuredOutputsParams

        ask = "Repeat this text exactly" if args.workload == "copy" else \
            'Repeat this text exactly, as JSON: {"text": "..."}'
        prompts = []
        for i in range(streams):
            text = PARAGRAPH if i == 0 else f"{PARAGRAPH} (Copy {i}.)"
            messages = [{"role": "user", "content": f"{ask}:\n\n{text}"}]
            prompts.append({"prompt_token_ids": llm.engine.render_chat(messages)})
        constraint = StructuredOutputsParams(json=JSON_COPY) if args.workload == "json-copy" else None
        return prompts, SamplingParams(temperature=0, max_tokens=args.output_len, detokenize=False,
                                       structured_outputs=constraint)
    g = torch.Generator().manual_seed(streams)
    vocab = llm.engine.vocab_size
    prompts = [{"prompt_token_ids": p} for p in torch.randint(3, vocab, (streams, args.input_len), generator=g).tolist()]
    return prompts, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)


def engine(args, method: str | None, reference: list[list[int]] | None):
    from paged import LLM

    spec = None
    if method in ("ngram", "oracle"):
        spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
                "prompt_lookup_min": args.lookup_min}
    elif method == "self-draft":
        spec = {"model": args.model_path, "num_speculative_tokens": args.k}
    elif method and method.startswith("draft="):
        spec = {"model": draft_folder(method.removeprefix("draft=")), "num_speculative_tokens": args.k}
    if spec is not None and args.disable_by_batch_size:
        spec["disable_by_batch_size"] = args.disable_by_batch_size
    llm = LLM(model=args.model_path, device=args.device, load_format=args.load_format,
              skip_tokenizer_init=args.workload == "random", gpu_memory_utilization=args.gpu_memory_utilization,
              kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len, speculative_config=spec,
              enforce_eager=args.enforce_eager)
    if args.sharpen:
        for runner in (llm.engine.core.runner, llm.engine.core.draft_runner):
            if runner is not None:
                with torch.no_grad():
                    runner.model.model.norm.weight.mul_(args.sharpen)
    if method == "oracle":
        llm.engine.core.proposer = OracleProposer(reference, args.oracle_miss, llm.engine.vocab_size)
    return llm


def measure(args, method: str | None, streams: int, reference=None) -> tuple[dict, list[tuple[list[int], list[int]]]]:
    """One configuration's run: its row, and each request's (prompt, prompt + output) for an oracle."""
    llm = engine(args, method, reference)
    prompts, params = requests(args, llm, streams)
    llm.generate(prompts[:2], params, use_tqdm=False)
    llm.engine.block_manager.reset_prefix_cache()
    before = llm.engine.stats
    drafted0, accepted0, drafts0 = before.spec_num_draft_tokens, before.spec_num_accepted_tokens, before.spec_num_drafts
    llm.engine.backend.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    stats = llm.engine.stats
    tokens = [(p["prompt_token_ids"], p["prompt_token_ids"] + o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    drafted, accepted = stats.spec_num_draft_tokens - drafted0, stats.spec_num_accepted_tokens - accepted0
    drafts = stats.spec_num_drafts - drafts0
    row = dict(method=method or "none", streams=streams, generated_tokens=generated, elapsed_s=round(wall, 3),
               output_tok_s=round(generated / wall, 1), drafted=drafted, accepted=accepted,
               acceptance=round(accepted / drafted, 3) if drafted else None,
               mean_acceptance_length=round(1 + accepted / drafts, 2) if drafts else None,
               device=llm.engine.backend.device_name(), k=args.k)
    del llm, outs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (--load-format dummy)")
    ap.add_argument("--device")
    ap.add_argument("--workload", choices=["copy", "json-copy", "random"], default="copy")
    ap.add_argument("--streams", default="1", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--methods", default="ngram", help="comma-separated: ngram, oracle, self-draft, draft=PATH|SHAPE")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=3)
    ap.add_argument("--lookup-min", type=int, default=1)
    ap.add_argument("--oracle-miss", type=int, default=0, help="every n-th oracle draft wrong (0: none)")
    ap.add_argument("--disable-by-batch-size", type=int)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sharpen", type=float, default=0.0,
                    help="multiply the final norm's weight (random weights' logits are nearly flat, so bf16 rounding "
                         "alone changes their argmax between kernels; sharper logits make greedy tokens robust)")
    args = ap.parse_args()
    args.load_format = "dummy" if args.shape else "auto"
    if args.shape:
        args.model_path = shape_folder(args.shape)
    else:
        from paged.default_model import default_model_path

        args.model_path = args.model or default_model_path()
    for streams in (int(s) for s in args.streams.split(",")):
        base, reference = measure(args, None, streams)
        rows = [measure(args, method, streams, reference)[0] for method in args.methods.split(",")]
        again, _ = measure(args, None, streams)
        baseline = (base["output_tok_s"] + again["output_tok_s"]) / 2
        for row in [base, *rows, again]:
            row["speedup"] = round(row["output_tok_s"] / baseline, 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
