"""Build a model on the backend's device and fill it from its checkpoint."""

from __future__ import annotations

import logging
import sys
from collections import Counter

import torch
from tqdm import tqdm

from paged.backends.interface import Backend, Communicator, Precision
from paged.errors import UserError
from paged.model_source import ModelSource
from paged.parallel import ParallelLayout
from paged.models.layers import BlockLoading, LinearBase
from paged.models.ops import bind_ops
from paged.models.registry import model_class
from paged.quant.linear import QuantizedLinearMethod
from paged.quant.registry import resolve_quantization

logger = logging.getLogger(__name__)


def quantized_linear(source: ModelSource, backend: Backend, quantization: str | None) -> QuantizedLinearMethod | None:
    """The decoder layers' method for a quantized checkpoint (or `--quantization fp8`), with the backend's kernel
    for its form; a one-line UserError naming both where the backend has none."""
    method = resolve_quantization(source.hf_config, quantization, source.gguf_file is not None, source.path)
    if method is None:
        return None
    kernel = backend.linear_kernel(method.form) if method.name in backend.supported_quantizations else None
    if kernel is None:
        raise UserError(f"backend {backend.name} does not run {method.name} quantization ({method.describe()}); "
                        f"it runs: {', '.join(backend.supported_quantizations) or 'none'}", param="quantization")
    return QuantizedLinearMethod(method, kernel)


def build_model(
    source: ModelSource,
    backend: Backend,
    precision: Precision,
    max_model_len: int,
    comm: Communicator | None = None,
    layout: ParallelLayout | None = None,
    load_format: str = "auto",
    quantization: str | None = None,
) -> torch.nn.Module:
    decoder_linear = quantized_linear(source, backend, quantization)
    try:
        cls = model_class(source.hf_config)
        dtype = precision.compute
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            ops = bind_ops(backend.ops(precision), decoder_linear)
            with torch.device(backend.device()):
                model = cls(source.hf_config, comm or backend.communicator(), backend.attention(max_model_len), ops,
                            max_model_len, layout)
        finally:
            torch.set_default_dtype(previous)
        # Counted before loading: a backend may repack the weights into buffers that are no parameters.
        model.num_parameters = sum(p.numel() for p in model.parameters()) + sum(
            out * inp for m in model.modules() if isinstance(m, LinearBase) and not hasattr(m, "weight")
            for out, inp in m.part_shapes)
        if load_format == "dummy":
            init_random(model)
            model.process_weights()
        else:
            linear = ops["linear"]
            # A tensor-parallel rank reads only its slices of each split matrix.
            sliced = comm is not None and comm.world_size > 1
            weights = tqdm(source.iter_weights(dtype, linear.block_types, model.holds, lazy=sliced),
                           desc="Loading weights", unit=" tensors",
                           file=sys.stderr, disable=None, leave=False)
            model.load_weights(weights)
    except ValueError as e:
        raise UserError(f"cannot load {source.path}: {e}") from None
    model.quantization = decoder_linear.method.describe() if decoder_linear else "none"
    linears = [m for m in model.modules() if isinstance(m, BlockLoading)]
    stored = Counter(m.method.storage(m) for m in linears)
    model.weight_storage = ", ".join(f"{kind} x{count}" for kind, count in stored.items())
    model.weight_bytes = sum(m.method.weight_bytes(m) for m in linears) + sum(
        t.nbytes for m in model.modules() if not isinstance(m, BlockLoading)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    logger.info("linear weights stored as: %s; weights %.2f GiB", model.weight_storage, model.weight_bytes / 2**30)
    return model.eval()


@torch.no_grad()
def init_random(model: torch.nn.Module) -> None:
    """Random weights of a realistic scale, for measuring a shape without its checkpoint."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for module in model.modules():
        if isinstance(module, LinearBase) and isinstance(module.method, QuantizedLinearMethod):
            module.method.fill_random(module, generator)
    for name, param in model.named_parameters():
        if param.dim() > 1:
            param.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
