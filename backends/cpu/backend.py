"""The host CPU: always available, gloo collectives, KV cache sized from a fixed byte budget."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

import numpy as np
import torch

from paged.backends.cpu.attention import TorchPagedAttention
from paged.backends.cpu import ops
from paged.backends.cpu.linear import OneDNNLinear
from paged.backends.interface import Attention, Availability, Backend


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

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # numpy's zeros come from calloc: the kernel hands out zero pages as they are first touched, so a
        # multi-GiB cache costs nothing at start-up (torch.zeros would write every byte first).
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(dtype).view(shape)

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # Attention runs in float32 here (see attention.py); storing K/V so saves a conversion per layer.
        return torch.float32

    def attention(self, max_model_len: int) -> Attention:
        return TorchPagedAttention()

    def ops(self) -> dict[str, Any]:
        faster: dict[str, Any] = {"rotary": ops.Rotary()}
        if torch.backends.mkldnn.is_available():
            faster["linear"] = OneDNNLinear()
        return faster
