"""Time to first token of one long prompt: paged against transformers' own forward pass, same process.

    python benchmarks/prefill.py --lengths 512,2048,8000

For each length, a random prompt of that many token ids: paged generates one token (the engine's own
chunked prefill, its default step size), and transformers runs one forward pass over the same ids
(logits for the last position only, which is all a first token needs) in the dtype it is fastest in on
this machine (float32 and bfloat16 both tried, the faster one kept). Each is timed `--repeats` times after
a warm-up, taking turns; medians are printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--lengths", default="512,2048,8000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="paged's dtype")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from paged import LLM, SamplingParams
    from paged.default_model import default_model_path

    model = args.model or default_model_path()
    llm = LLM(model=model, dtype=args.dtype, max_model_len=8192)
    path = Path(model)
    kwargs = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    peers = {d: AutoModelForCausalLM.from_pretrained(folder, dtype=d, **kwargs).eval()
             for d in (torch.float32, torch.bfloat16)}
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False)

    def paged(ids: list[int]) -> float:
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
        return time.perf_counter() - t

    def forward(model, ids: list[int]) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(torch.tensor([ids]), logits_to_keep=1)
        return time.perf_counter() - t

    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (int(v) for v in args.lengths.split(",")):
        warm = torch.randint(0, vocab, (length,), generator=generator).tolist()
        paged(warm)
        best_dtype = min(peers, key=lambda d: forward(peers[d], warm[:512]) + forward(peers[d], warm[:512]))
        forward(peers[best_dtype], warm)
        times: dict[str, list[float]] = {"paged": [], "transformers": []}
        for _ in range(args.repeats):
            # A fresh prompt each time: a repeated one would hit paged's prefix cache.
            ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
            times["paged"].append(paged(ids))
            times["transformers"].append(forward(peers[best_dtype], ids))
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(prompt_tokens=length, paged_ttft_s=round(medians["paged"], 3),
                         transformers_forward_s=round(medians["transformers"], 3),
                         transformers_dtype=str(best_dtype).removeprefix("torch."),
                         ratio=round(medians["transformers"] / medians["paged"], 2)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    import transformers

    print(json.dumps(dict(paged_dtype=str(llm.engine.precision), step_tokens=llm.engine.max_num_batched_tokens,
                          device=llm.engine.backend.device_name(), rows=rows,
                          versions=dict(torch=torch.__version__, transformers=transformers.__version__))))


if __name__ == "__main__":
    main()
