"""Build a model on the backend's device and fill it from its checkpoint."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from paged.backends.interface import Backend, Communicator
from paged.errors import UserError
from paged.model_source import ModelSource
from paged.models.ops import bind_ops
from paged.models.registry import model_class


def build_model(
    source: ModelSource, backend: Backend, dtype: torch.dtype, max_model_len: int, comm: Communicator | None = None
) -> torch.nn.Module:
    try:
        cls = model_class(source.hf_config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(backend.device()):
                model = cls(source.hf_config, comm or backend.communicator(), backend.attention(max_model_len),
                            bind_ops(backend.ops()), max_model_len)
        finally:
            torch.set_default_dtype(previous)
        weights = tqdm(source.iter_weights(dtype), desc="Loading weights", unit=" tensors", file=sys.stderr,
                       disable=None, leave=False)
        model.load_weights(weights)
    except ValueError as e:
        raise UserError(f"cannot load {source.path}: {e}") from None
    return model.eval()
