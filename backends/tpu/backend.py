"""Google TPUs the way vLLM's tpu-inference runs PyTorch models: JAX underneath, torchax in between.

The model is the same torch module every backend runs; its tensors live on torchax's "jax" device, so
each torch op becomes a JAX op. Decode steps are compiled by XLA as whole programs (see graphs.py) at
the runner's padded batch sizes; attention is a JAX function (attention.py) padded to shape buckets;
collectives are XLA ops over a device mesh (communicator.py). JAX also runs on the CPU, so with
PAGED_TPU_ALLOW_CPU=1 this exact code runs in CI on JAX's CPU platform.

Sampling generators are host generators: torch makes none for torchax's device (a PrivateUse1 device
registered from Python), and torchax seeds its JAX PRNG keys from a generator's seed.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from paged.backends.interface import Attention, Availability, Backend, Communicator, SingleRankCommunicator
from paged.backends.tpu import runtime


class TPUBackend(Backend):
    name = "tpu"
    device_type = "jax"  # torchax's device
    dist_backend = "xla"  # not torch.distributed: XLA collectives over a JAX mesh
    ray_resource = "TPU"
    visible_devices_env = "TPU_VISIBLE_CHIPS"
    supported_dtypes = (torch.bfloat16, torch.float32)
    supported_block_sizes = (16, 32, 64, 128)
    supports_graphs = True
    supports_pipeline = False  # one SPMD process drives every chip: there are no stages to hand activations to

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def __init__(self) -> None:
        self.env = runtime.enable_torchax()
        import jax

        self.platform = jax.default_backend()
        self.devices = jax.devices()
        # On TPU the cache fills what HBM is left; JAX's CPU stand-in sizes it like the CPU backend.
        self.kv_cache_from_device_memory = self.platform == "tpu"

    @classmethod
    def is_available(cls) -> Availability:
        return runtime.probe(runtime.allow_cpu())

    def device_count(self) -> int:
        return len(self.devices)

    def device_name(self, index: int = 0) -> str:
        return self.devices[index].device_kind

    def _memory(self, index: int) -> dict[str, int]:
        """JAX's allocator statistics; None on platforms without them (CPU), where host memory counts."""
        stats = self.devices[index].memory_stats()
        if stats:
            return stats
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        return {"bytes_limit": total, "bytes_in_use": total - page * os.sysconf("SC_AVPHYS_PAGES")}

    def total_memory(self, index: int = 0) -> int:
        return self._memory(index)["bytes_limit"]

    def free_memory(self, index: int = 0) -> int:
        stats = self._memory(index)
        return stats["bytes_limit"] - stats["bytes_in_use"]

    def peak_memory(self) -> int:
        return self._memory(0).get("peak_bytes_in_use", 0)

    def device(self, index: int = 0) -> torch.device:
        return torch.device("jax", index)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.env.manual_seed(seed)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """K and V of a head interleaved in one dimension: the Pallas ragged paged attention layout."""
        return (num_blocks, block_size, 2 * num_kv_heads, head_dim)

    def attention(self, max_model_len: int) -> Attention:
        from paged.backends.tpu.attention import JaxPagedAttention

        return JaxPagedAttention(use_pallas=self.platform == "tpu")

    def communicator(self, rank: int = 0, world_size: int = 1, group: Any = None) -> Communicator:
        if world_size == 1:
            return SingleRankCommunicator()
        from paged.backends.tpu.communicator import XLACommunicator, device_mesh

        return XLACommunicator(device_mesh(world_size))

    def capture_graph(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        from paged.backends.tpu.graphs import capture

        return capture(fn)
