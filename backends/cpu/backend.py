"""The host CPU: always available, gloo collectives, KV cache sized from a fixed byte budget."""

from __future__ import annotations

import logging
import math
import os
import platform
from typing import Any

import numpy as np
import torch

from paged.backends.cpu.attention import TorchPagedAttention
from paged.backends.cpu.ops import LayerOps
from paged.backends.cpu.linear import OneDNNLinear
from paged.backends.cpu.native import load_kernels
from paged.backends.interface import Attention, Availability, Backend

logger = logging.getLogger(__name__)


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    visible_devices_env = None
    supported_dtypes = (torch.bfloat16, torch.float32)
    supported_block_sizes = (8, 16, 32, 64, 128)
    kv_cache_from_device_memory = False

    def __init__(self) -> None:
        # Use every core the process may run on: torch's default can be lower inside containers.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(cores)

    @classmethod
    def is_available(cls) -> Availability:
        return Availability(True, f"host CPU ({platform.machine()}, {os.cpu_count()} cores) is always present")

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return _cpu_model_name()

    def total_memory(self, index: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self, index: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        # A (block, head) tile is contiguous: see attention.py for why the CPU wants that.
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # numpy's zeros come from calloc: the kernel hands out zero pages as they are first touched, so a
        # multi-GiB cache costs nothing at start-up (torch.zeros would write every byte first).
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(dtype).view(shape)

    def attention(self, max_model_len: int) -> Attention:
        return TorchPagedAttention()

    def ops(self) -> dict[str, Any]:
        kernels, why = load_kernels()
        logger.info("CPU kernels: %s", why)
        faster = LayerOps(kernels).table()
        if torch.backends.mkldnn.is_available():
            faster["linear"] = OneDNNLinear(kernels)
        return faster
