"""Write the serving benchmark's model: a Llama shape with random bf16 weights and SmolLM2's tokenizer.

    python benchmarks/serving_model.py --tokenizer TOKENIZER_FOLDER --out /tmp/serve-1b [--shape 1b]

Real weight files (not --load-format dummy), so `transformers serve` loads the very same model as paged;
the vocabulary is the tokenizer's (49,152 for SmolLM2), as in ../shared/peers/RESULTS-H200.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from throughput import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder holding the tokenizer (and chat template)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    args = ap.parse_args()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = {**SHAPES[args.shape], "vocab_size": len(tokenizer)}
    config = LlamaConfig(**shape, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {args.shape} shape, vocab {len(tokenizer)}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
