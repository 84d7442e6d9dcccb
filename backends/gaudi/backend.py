"""Intel Gaudi accelerators through habana_frameworks.torch: the "hpu" device, HPU graphs, HCCL.

The model runs as ordinary torch on the hpu device (eager mode, PT_HPU_LAZY_MODE=0: the core never calls
mark_step); decode steps are captured as HPU graphs, which the runner replays at its padded batch
sizes; attention (attention.py) gathers through the block table over bucketed static shapes, because
the graph compiler compiles once per shape. The probe imports habana_frameworks only when it is
installed, and reports why not otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

import torch

from paged.backends.interface import Attention, Availability, Backend, Communicator


def _hpu() -> Any:
    """habana_frameworks.torch.hpu (torch.hpu's implementation); importing it registers the device."""
    return importlib.import_module("habana_frameworks.torch.hpu")


class GaudiBackend(Backend):
    name = "gaudi"
    device_type = "hpu"
    dist_backend = "hccl"
    ray_resource = "HPU"
    visible_devices_env = "HABANA_VISIBLE_MODULES"
    supported_dtypes = (torch.bfloat16, torch.float32)
    supported_block_sizes = (16, 32, 64, 128)
    supports_graphs = True

    @classmethod
    def is_available(cls) -> Availability:
        if importlib.util.find_spec("habana_frameworks") is None:
            return Availability(False, "habana_frameworks is not installed (the Intel Gaudi software stack)")
        try:
            hpu = _hpu()
            count = hpu.device_count() if hpu.is_available() else 0
        except Exception as e:  # a driver or firmware mismatch surfaces as any error type
            return Availability(False, f"habana_frameworks did not load: {type(e).__name__}: {e}")
        if count == 0:
            return Availability(False, "habana_frameworks is installed but sees no Gaudi device")
        return Availability(True, f"{count} Gaudi device(s) ({hpu.get_device_name(0)})")

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def fp8_dtype(self) -> torch.dtype | None:
        return torch.float8_e4m3fn

    def device_count(self) -> int:
        return _hpu().device_count()

    def device_name(self, index: int = 0) -> str:
        return _hpu().get_device_name(index)

    def _memory(self) -> dict[str, int]:
        """The HPU allocator's statistics: Limit, InUse, MaxInUse (bytes)."""
        return _hpu().memory_stats()

    def total_memory(self, index: int = 0) -> int:
        return self._memory()["Limit"]

    def free_memory(self, index: int = 0) -> int:
        stats = self._memory()
        return stats["Limit"] - stats["InUse"]

    def peak_memory(self) -> int:
        return self._memory()["MaxInUse"]

    def reset_peak_memory(self) -> None:
        _hpu().reset_peak_memory_stats()

    def set_device(self, index: int) -> None:
        _hpu().set_device(index)

    def synchronize(self) -> None:
        _hpu().synchronize()

    def attention(self, max_model_len: int) -> Attention:
        from paged.backends.gaudi.attention import GaudiPagedAttention

        return GaudiPagedAttention()

    def communicator(self, rank: int = 0, world_size: int = 1, group: Any = None) -> Communicator:
        if world_size > 1:
            importlib.import_module("habana_frameworks.torch.distributed.hccl")  # registers "hccl"
        return super().communicator(rank, world_size, group)

    def capture_graph(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Record fn as an HPU graph on a side stream (the pattern of Habana's HPU graph API), warmed up first."""
        hpu = _hpu()
        fn()  # warm-up: the graph compiler compiles here, not during capture
        hpu.synchronize()
        graph, stream = hpu.HPUGraph(), hpu.Stream()
        with hpu.stream(stream):
            graph.capture_begin()
            output = fn()
            graph.capture_end()
        hpu.synchronize()

        def replay() -> Any:
            graph.replay()
            return output

        return replay
