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
from paged.models.layers import BlockLoading
from paged.models.ops import bind_ops
from paged.models.registry import model_class

logger = logging.getLogger(__name__)


def build_model(
    source: ModelSource,
    backend: Backend,
    precision: Precision,
    max_model_len: int,
    comm: Communicator | None = None,
    load_format: str = "auto",
) -> torch.nn.Module:
    try:
        cls = model_class(source.hf_config)
        dtype = precision.compute
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            ops = bind_ops(backend.ops(precision))
            with torch.device(backend.device()):
                model = cls(source.hf_config, comm or backend.communicator(), backend.attention(max_model_len), ops,
                            max_model_len)
        finally:
            torch.set_default_dtype(previous)
        # Counted before loading: a backend may repack the weights into buffers that are no parameters.
        model.num_parameters = sum(p.numel() for p in model.parameters())
        if load_format == "dummy":
            init_random(model)
            model.process_weights()
        else:
            linear = ops["linear"]
            weights = tqdm(source.iter_weights(dtype, linear.block_types), desc="Loading weights", unit=" tensors",
                           file=sys.stderr, disable=None, leave=False)
            model.load_weights(weights)
    except ValueError as e:
        raise UserError(f"cannot load {source.path}: {e}") from None
    stored = Counter(m.method.storage(m) for m in model.modules() if isinstance(m, BlockLoading))
    model.weight_storage = ", ".join(f"{kind} x{count}" for kind, count in stored.items())
    logger.info("linear weights stored as: %s", model.weight_storage)
    return model.eval()


@torch.no_grad()
def init_random(model: torch.nn.Module) -> None:
    """Random weights of a realistic scale, for measuring a shape without its checkpoint."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if param.dim() > 1:
            param.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
