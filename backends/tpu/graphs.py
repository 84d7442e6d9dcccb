"""Decode "graphs" for JAX: one step of the model, traced once and compiled by XLA as a single program.

A CUDA graph replays kernels against fixed addresses. The JAX counterpart is a jitted pure function:
its inputs are the arrays of the torchax tensors the step reads (weights, KV caches, the runner's
static input buffers), its outputs the step's result and the new arrays of the tensors it wrote (the
caches, donated so XLA updates them in place). The runner pads every decode step to a captured batch
size, so the tokens, sequences and block tables have static shapes and each size compiles once.

The step is a closure, so its tensors are found rather than passed: every torchax tensor alive at
capture is a candidate input (jit drops those the step never reads), and which of them the step writes
is seen by tracing it once.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import jax


def _set(tensor: Any, array: jax.Array) -> None:
    tensor.apply_jax_(lambda _: array)


def _run_with(fn: Callable[[], Any], tensors: list[Any], arrays: list[jax.Array]) -> tuple[Any, list[jax.Array]]:
    """fn's result (as arrays) with each tensor holding the matching array, and the tensors' arrays after.

    The tensors get their own arrays back afterwards: under tracing, the arrays are tracers.
    """
    from torchax.interop import jax_view

    saved = [t.jax() for t in tensors]
    for t, a in zip(tensors, arrays):
        _set(t, a)
    try:
        return jax_view(fn()), [t.jax() for t in tensors]
    finally:
        for t, a in zip(tensors, saved):
            _set(t, a)


def capture(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Compile fn (a closure over torchax tensors) and return a replay that runs the compiled program."""
    from torchax.interop import torch_view
    from torchax.tensor import Tensor

    gc.collect()
    tensors = [o for o in gc.get_objects() if type(o) is Tensor and not o.jax().is_deleted()]
    wrote: list[bool] = []

    def find_writes(arrays: list[jax.Array]) -> Any:
        out, after = _run_with(fn, tensors, arrays)
        wrote.extend(a is not b for a, b in zip(arrays, after))
        return out

    jax.eval_shape(find_writes, [t.jax() for t in tensors])  # traces once, computes nothing
    read_only = [t for t, w in zip(tensors, wrote) if not w]
    written = [t for t, w in zip(tensors, wrote) if w]

    def step(read_arrays: list[jax.Array], written_arrays: list[jax.Array]) -> tuple[Any, list[jax.Array]]:
        out, after = _run_with(fn, read_only + written, read_arrays + written_arrays)
        return out, after[len(read_only) :]

    compiled = jax.jit(step, donate_argnums=1)

    def replay() -> Any:
        out, new_arrays = compiled([t.jax() for t in read_only], [t.jax() for t in written])
        for t, a in zip(written, new_arrays):
            _set(t, a)
        return torch_view(out)

    replay()  # compile now, not on the first request
    return replay
