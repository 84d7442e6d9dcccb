"""`paged info`: every registered backend, whether it can run here and why, which one would, and what that
one found here (for the CPU: the probed instruction-set level and the paths it picks). With --model (and
-tp / -pp): how that model would be split, each stage's layers and ranks, and where the ranks would run.

With --matrix: the compatibility matrix instead, each backend's declared facts, marked verified where the
conformance reports shipped with paged (backends/common/verified) and any given with --merge say so;
--write saves it as markdown (COMPATIBILITY.md is made this way).
"""

from __future__ import annotations

import argparse
from pathlib import Path

MATRIX_TITLE = "# Compatibility\n\n"
MATRIX_LEGEND = (
    "Each cell is what the backend declares; ✓ marks what the conformance suite (tests/backends) verified, "
    "✗ what it failed, and the last column says where. Quantization lists the methods a backend runs "
    "(`--quantization`, or a checkpoint's own), kv cache the `--kv-cache-dtype` values it takes (checked by "
    "tests/test_quantization.py and, on a GPU, tests/test_gpu.py). Tensor parallel names the collectives and is "
    "verified by two ranks exchanging tensors (on the CPU, models split over two gloo ranks are checked by "
    "tests/test_tensor_parallel.py). Regenerate: run the "
    "suite with "
    "PAGED_MATRIX_OUT=report.json, put the report in backends/common/verified/ (it ships with the package), then "
    "`paged info --matrix --write COMPATIBILITY.md`.\n\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="check this backend as `--device` would")
    parser.add_argument("--matrix", action="store_true", help="print the compatibility matrix")
    parser.add_argument("--merge", nargs="+", default=[], metavar="FILE",
                        help="with --matrix: conformance reports (JSON) to mark over the shipped ones")
    parser.add_argument("--write", metavar="PATH", help="with --matrix: also write the matrix as markdown")
    parser.add_argument("--model", help="show how this model would be split (default model: omit with -tp/-pp)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", choices=["mp", "ray"])


def run(args: argparse.Namespace) -> int:
    from paged.backends.registry import choose, discover

    registered = discover()
    if args.matrix:
        return _matrix(registered, args)
    print(f"{'backend':<10} {'available':<10} {'source':<12} reason")
    for reg in registered:
        facts = reg.facts()
        print(f"{facts.name:<10} {'yes' if facts.available else 'no':<10} {facts.source:<12} {facts.reason}")
    chosen = choose(registered, args.device)
    print(f"\nchosen: {chosen.name}")
    for line in chosen.backend.describe():
        print(f"  {line}")
    if args.model or args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        _layout(chosen.backend(), args)
    return 0


def _layout(backend, args: argparse.Namespace) -> None:
    """The split the engine would make of the model: a UserError (one line) where it cannot."""
    from paged.config import EngineConfig
    from paged.executor import check_parallelism, distributed_backend
    from paged.model_source import source_of
    from paged.models.layers import kv_head_splits
    from paged.parallel import layout_of

    config = EngineConfig.from_kwargs(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                                      pipeline_parallel_size=args.pipeline_parallel_size,
                                      distributed_executor_backend=args.distributed_executor_backend)
    hf = source_of(config).hf_config
    check_parallelism(config, backend, hf)
    layout = layout_of(config)
    kv_heads = hf.num_key_value_heads // kv_head_splits(hf.num_attention_heads, hf.num_key_value_heads, layout.tensor)
    where = f"ranks 1..{layout.world_size - 1} run in: {distributed_backend(config, backend)}" \
        if layout.world_size > 1 else "one rank"
    print(f"\nlayout: {layout.describe(hf.num_hidden_layers)}")
    print(f"  per rank: {hf.num_attention_heads // layout.tensor} attention heads, {kv_heads} KV heads; {where}")


def _matrix(registered: list, args: argparse.Namespace) -> int:
    from paged.backends.common.matrix import Row, declared_facts, load_reports, merge, shipped_reports, to_markdown

    rows = [Row(reg.name, declared_facts(reg.backend) if reg.backend is not None else {}) for reg in registered]
    table = to_markdown(merge(rows, load_reports(shipped_reports() + args.merge)))
    print(table, end="")
    if args.write:
        Path(args.write).write_text(MATRIX_TITLE + MATRIX_LEGEND + table)
    return 0
