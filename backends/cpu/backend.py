"""The host CPU: always available, gloo collectives, KV cache sized from a fixed byte budget."""

from __future__ import annotations

import logging
import os
import platform
from functools import cached_property
from typing import Any

import torch

from paged.backends.cpu.attention import TorchPagedAttention
from paged.backends.cpu.isa import CPUCapabilities, probe
from paged.backends.cpu.linear import PACKED_GEMM_MAX_ROWS, OneDNNLinear, PackedLinear
from paged.backends.cpu.native import AVX2Kernels, BF16Kernels, load_avx2_kernels, load_bf16_kernels
from paged.backends.cpu.packing import BLOCK_TYPES
from paged.backends.cpu.ops import LayerOps
from paged.backends.common.quant_linear import DequantizingLinear, Int8Linear
from paged.backends.interface import Attention, Availability, Backend, LinearKernel, Precision

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
    ray_resource = "CPU"
    visible_devices_env = None
    supported_dtypes = (torch.bfloat16, torch.float32)
    supported_block_sizes = (8, 16, 32, 64, 128)
    supported_quantizations = ("gguf", "awq", "gptq", "compressed-tensors", "fp8")
    supported_kv_cache_dtypes = ("auto", "fp8")
    kv_cache_from_device_memory = False
    # Measured (benchmarks/RESULTS.md, SmolLM2 copying): drafts pay up to four sequences, not at sixteen.
    speculation_max_batch = 4

    def __init__(self) -> None:
        # Use every core the process may run on: torch's default can be lower inside containers.
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(len(self.cores) if self.cores else os.cpu_count() or 1)
        self.caps: CPUCapabilities = probe()
        logger.info("CPU: %s", self.caps.describe())

    @cached_property
    def _bf16_kernels(self) -> tuple[BF16Kernels | None, str]:
        return load_bf16_kernels(self.caps)

    @cached_property
    def _avx2_kernels(self) -> tuple[AVX2Kernels | None, str]:
        return load_avx2_kernels(self.caps)

    @classmethod
    def is_available(cls) -> Availability:
        return Availability(True, f"host CPU ({platform.machine()}, {os.cpu_count()} cores) is always present")

    def device_count(self) -> int:
        return 1

    def place_rank(self, local_rank: int, local_ranks: int) -> None:
        """Ranks sharing this machine split its cores, each pinned to its own slice (several ranks per core
        where there are more ranks than cores): with every rank spreading threads over every core, stages of
        a pipeline working at once oversubscribe the cores and each runs several times slower. One rank
        (an engine that shut its workers down) takes every core back."""
        if self.cores is None:
            return
        share = max(1, len(self.cores) // local_ranks)
        start = (local_rank * share) % len(self.cores)
        mine = self.cores[start : start + share]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))

    def max_ranks(self) -> None:
        return None  # ranks are processes sharing the host's cores

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
        # Written through once here: a lazily zeroed cache would be paged in as freed blocks rotate through
        # the free queue, so the resident set would climb to the whole budget over hours and look like a leak.
        # Touched now, it is the budget from the start and flat after (about a second for 4 GiB).
        return torch.zeros(shape, dtype=dtype)

    def attention(self, max_model_len: int) -> Attention:
        return TorchPagedAttention(self._avx2_kernels[0])

    def precision(self, requested: torch.dtype | None, stored: torch.dtype | str | None) -> Precision:
        """`auto` gives the fastest dtype this CPU really has. A GGUF stored in Q4_0 / Q4_1 / Q8_0 computes in
        float32 from its blocks as they are (where the AVX2 kernels run; exact, and a quarter to half the
        bytes of bfloat16). Other checkpoints: bfloat16 where the CPU multiplies bfloat16 in hardware, else
        float32 arithmetic over bfloat16-stored weights (AVX2 kernels), else plain float32. A float32
        checkpoint stays float32."""
        caps = self.caps
        if requested == torch.bfloat16 and not caps.native_bf16:
            logger.warning("bfloat16 was requested, but this CPU (%s) has no bfloat16 arithmetic: it runs through "
                           "plain torch, several times slower than dtype auto", caps.level)
        if requested is not None or stored == torch.float32:
            return super().precision(requested, stored)
        kernels, why = self._avx2_kernels
        if kernels is not None and stored in BLOCK_TYPES:
            return Precision(torch.float32, torch.bfloat16, f"{caps.level}: the AVX2 kernels multiply the blocks as "
                             "they are (any matrix of another type is packed as bfloat16)", kept=f"GGUF {stored} blocks")
        if caps.native_bf16:
            return Precision(torch.bfloat16, torch.bfloat16, f"{caps.level}: bfloat16 arithmetic in hardware")
        if kernels is not None:
            return Precision(torch.float32, torch.bfloat16, f"{caps.level}: no bfloat16 arithmetic; the AVX2 kernels "
                             "read bfloat16 weights, half the bytes of float32")
        return Precision(torch.float32, torch.float32, f"{caps.level}: no bfloat16 arithmetic, and no AVX2 kernels "
                         f"({why})")

    def linear_kernel(self, form: str) -> LinearKernel | None:
        """No FP8 units and no int4 kernel here: 4-bit and FP8 weights are widened per call (they stay small in
        memory), INT8 W8A8 runs through torch's int8 GEMM."""
        return Int8Linear() if form == "int8" else DequantizingLinear()

    def ops(self, precision: Precision) -> dict[str, Any]:
        table = LayerOps([k for k in self._layer_kernels(precision.compute) if k is not None]).table()
        linear = self._linear(precision)
        if linear is not None:
            table["linear"] = linear
        logger.info("CPU paths for %s: %s", precision, "; ".join(self._paths(precision)))
        return table

    def _layer_kernels(self, dtype: torch.dtype) -> list:
        if dtype == torch.bfloat16:
            return [self._bf16_kernels[0]]
        return [self._avx2_kernels[0]] if dtype == torch.float32 else []

    def _linear(self, precision: Precision):
        if precision.weights != precision.compute:
            kernels = self._avx2_kernels[0]
            if precision.compute != torch.float32 or precision.weights != torch.bfloat16 or kernels is None:
                raise ValueError(f"the CPU backend has no linear layers for {precision}")
            return PackedLinear(kernels)
        if precision.compute == torch.bfloat16 and self.caps.onednn_bf16 and OneDNNLinear.runs(torch.bfloat16):
            return OneDNNLinear(self._bf16_kernels[0])
        if precision.compute == torch.float32 and self.caps.onednn and OneDNNLinear.runs(torch.float32):
            return OneDNNLinear()
        return None  # plain F.linear

    def _paths(self, precision: Precision) -> list[str]:
        linear = self._linear(precision)
        if isinstance(linear, PackedLinear):
            matmul = (f"AVX2 kernel over weights kept in GGUF's Q4_0/Q4_1/Q8_0 blocks, or packed as bfloat16 "
                      f"(BLAS above {PACKED_GEMM_MAX_ROWS} rows)")
        elif isinstance(linear, OneDNNLinear):
            matmul = "oneDNN" + (", AVX-512 BF16 GEMV for 1-2 rows" if linear.kernels is not None else "")
        else:
            matmul = "plain torch"
        kernels, why = {torch.bfloat16: self._bf16_kernels, torch.float32: self._avx2_kernels}.get(
            precision.compute, (None, f"no kernels for {precision.compute}"))
        ops = "norms, rotary, SiLU and decode attention" if kernels is self._avx2_kernels[0] else "norms and rotary"
        layer = f"{ops}: compiled ({why})" if kernels is not None else f"layer ops: plain torch ({why})"
        return [f"linear layers: {matmul}", layer]

    # About two seconds of two cores' float32 arithmetic (2 x parameters FLOPs per token).
    STEP_FLOPS = 4e11

    def max_num_batched_tokens(self, num_parameters: int, max_num_seqs: int) -> int:
        """A power of two of tokens worth about STEP_FLOPS, at least one decode token per sequence and at most
        the accelerators' 8,192: 1,024 for a 135M model (an 8,192-token step of it takes a CPU ~15 s)."""
        fits = max(int(self.STEP_FLOPS // (2 * max(num_parameters, 1))), 1)
        return max(min(1 << (fits.bit_length() - 1), 8192), max_num_seqs)

    def api_server_count(self, host_cores: int) -> int:
        """One: every core a second API server would take is a core the model computes on."""
        return 1

    @classmethod
    def describe(cls) -> list[str]:
        backend = cls()  # a probe and the kernels' build: no device to initialise
        auto, gguf = backend.precision(None, torch.bfloat16), backend.precision(None, "Q4_1")
        return [f"CPU: {backend.caps.describe()}", f"dtype auto: {auto} ({auto.why})", *backend._paths(auto),
                f"dtype auto for a GGUF in Q4_0, Q4_1 or Q8_0: {gguf} ({gguf.why})"]
