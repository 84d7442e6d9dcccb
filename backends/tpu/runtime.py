"""JAX and torchax, imported only when the TPU backend is probed or used.

Importing jax costs seconds and initialising its TPU client takes the chips, so the probe first looks
for the packages without importing them. torchax 0.0.13 (the newest on PyPI) names ATen overloads that
torch 2.13 removed; `_missing_named_overloads_are_none` bridges that until a release carries the
upstream fix, and `_fill_gaps` makes the few ops the models need behave as in torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Any, Iterator

from paged.backends.interface import Availability

ALLOW_CPU_ENV = "PAGED_TPU_ALLOW_CPU"
INSTALL_HINT = "pip install 'jax[tpu]' && pip install --no-deps torchax"


def allow_cpu() -> bool:
    """Whether the backend may run on JAX's CPU platform: for testing its real code on machines without TPU."""
    return os.environ.get(ALLOW_CPU_ENV, "") not in ("", "0")


@functools.cache
def probe(allow_cpu_platform: bool) -> Availability:
    """Whether JAX sees TPU chips (or, when allowed, may stand in with another platform), and why not."""
    for package in ("jax", "torchax"):
        if importlib.util.find_spec(package) is None:
            return Availability(False, f"{package} is not installed ({INSTALL_HINT})")
    if importlib.util.find_spec("libtpu") is None and not allow_cpu_platform:
        return Availability(False, f"no TPU runtime (libtpu is not installed); {ALLOW_CPU_ENV}=1 runs on JAX's CPU")
    import jax

    try:
        chips = jax.devices("tpu")
    except RuntimeError:
        chips = []
    if chips:
        reason = f"{len(chips)} TPU chip(s) ({chips[0].device_kind}) visible to jax {jax.__version__}"
    else:
        platforms = ", ".join(sorted({d.platform for d in jax.devices()}))
        if not allow_cpu_platform:
            return Availability(False, f"no TPU devices; JAX platforms: {platforms}")
        reason = f"no TPU devices; running on JAX's {jax.default_backend()} platform because {ALLOW_CPU_ENV}=1"
    try:
        torchax_env()
    except Exception as e:  # an incompatible torchax/torch pair fails in many ways; report, never crash
        return Availability(False, f"torchax does not load: {type(e).__name__}: {e}")
    return Availability(True, reason)


@contextlib.contextmanager
def _missing_named_overloads_are_none() -> Iterator[None]:
    """Let `torch.ops.aten.<op>.<named-tensor overload>` be None while torchax builds its op tables.

    torch 2.13 dropped the named-tensor (Dimname) overloads; torchax <= 0.0.13 lists them in dicts and
    decomposition lists, where a None entry is ignored. Only missing names containing "name" change.
    """
    from torch._ops import OpOverloadPacket

    original = OpOverloadPacket.__getattr__

    def lookup(self: OpOverloadPacket, key: str) -> Any:
        try:
            return original(self, key)
        except AttributeError:
            if "name" in key.lower():
                return None
            raise

    OpOverloadPacket.__getattr__ = lookup
    try:
        yield
    finally:
        OpOverloadPacket.__getattr__ = original


@functools.cache
def torchax_env() -> Any:
    """torchax's default environment, imported on first use and fitted to what the core does with it."""
    with _missing_named_overloads_are_none():
        import torchax

        env = torchax.default_env()
    _fill_gaps(env)
    # torchax warns on every `param.data` access, which weight loading does once per tensor.
    logging.getLogger("torchax.tensor").setLevel(logging.ERROR)
    return env


def _fill_gaps(env: Any) -> None:
    """Ops that torchax lacks or treats differently from torch, where the models rely on torch's way.

    - narrow: torchax returns a copy, so weight loading's `param.data.narrow(...).copy_(shard)` (packed
      q/k/v and gate/up) would write nowhere; here it returns a torchax View, which writes through.
    - asarray on a host object (safetensors builds tensors from storages this way): under torchax's
      dispatch mode it fails; it never needs JAX, so it runs with the modes off.
    - chunk (rotary, SiLU-and-multiply): torchax has no lowering; it is split into pieces of ceil(n / chunks).
    """
    import torch
    import torch.utils._mode_utils as mode_utils
    from torchax.view import NarrowInfo, View

    def narrow(tensor: Any, dim: int, start: int, length: int) -> Any:
        index = (slice(None),) * (dim % tensor.ndim) + (slice(start, start + length),)
        return View(tensor, NarrowInfo(index), env)

    def host_asarray(obj: Any, **kwargs: Any) -> torch.Tensor:
        with mode_utils.no_dispatch(), torch._C.DisableTorchFunction():
            return torch.asarray(obj, **kwargs)

    def chunk(tensor: Any, chunks: int, dim: int = 0) -> Any:
        return torch.split(tensor, -(-tensor.shape[dim] // chunks), dim)

    for op in (torch.narrow, torch.Tensor.narrow, torch.ops.aten.narrow.default):
        env.override_op_definition(op, narrow, is_view_op=True)
    env.override_op_definition(torch.asarray, host_asarray)
    env.override_op_definition(torch.ops.aten.chunk.default, chunk)


_enabled = False


def enable_torchax() -> Any:
    """Route torch ops on "jax" tensors to JAX for the whole process; returns the environment.

    torchax dispatches only while its torch modes are active, and the core calls the model directly,
    so the backend turns them on process-wide when it is instantiated (as tpu-inference does).
    Ops on plain CPU tensors still run in torch. (The environment's own `enabled` flag cannot say
    whether this was done: torchax enters and leaves the environment around every op.)
    """
    global _enabled
    env = torchax_env()
    if not _enabled:
        env.enable_torch_modes()
        _enabled = True
    return env


def disable_torchax() -> None:
    """Undo enable_torchax: torch ops run in torch again (for processes that go on without the backend)."""
    global _enabled
    if _enabled:
        torchax_env().disable_torch_modes()
        _enabled = False
