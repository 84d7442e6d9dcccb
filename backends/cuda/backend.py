"""NVIDIA GPUs: Triton kernels, CUDA graphs for decode steps, NCCL collectives.

The probe never initialises a CUDA context (torch.cuda.device_count asks NVML / the driver only), so
`paged info` on a GPU machine stays quick and leaves the device untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from paged.backends.interface import (
    Attention,
    Availability,
    Backend,
    LinearKernel,
    Precision,
)


class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    supported_block_sizes = (16, 32, 64, 128)
    supported_quantizations = ("gguf", "awq", "gptq", "compressed-tensors", "fp8")
    supported_kv_cache_dtypes = ("auto", "fp8")
    supports_graphs = True
    runs_ahead = True
    # The largest batch with graphs for steps of several tokens a request (model_runner.MULTI_TOKEN_BATCH).
    speculation_max_batch = 32
    # Which torch build this backend serves; ROCm reuses everything else and flips this.
    torch_build = "cuda"

    def __init__(self) -> None:
        self._graph_pool: Any = None

    @classmethod
    def is_available(cls) -> Availability:
        build = cls._torch_build()
        if build != cls.torch_build:
            return Availability(False, f"torch is a {build} build (torch {torch.__version__}), not a {cls.torch_build} one")
        try:
            count = torch.cuda.device_count()
        except RuntimeError as e:  # a driver that cannot be talked to
            return Availability(False, f"the GPU driver did not answer: {e}")
        if count == 0:
            return Availability(False, f"torch {torch.__version__} is a {build} build but sees no GPU")
        return Availability(True, f"{count} GPU(s) visible to torch {torch.__version__}")

    @staticmethod
    def _torch_build() -> str:
        if getattr(torch.version, "hip", None):
            return "rocm"
        if getattr(torch.version, "cuda", None):
            return "cuda"
        return "cpu-only"

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def total_memory(self, index: int = 0) -> int:
        return torch.cuda.get_device_properties(index).total_memory

    def free_memory(self, index: int = 0) -> int:
        return torch.cuda.mem_get_info(index)[0]

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)

    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def fp8_dtype(self) -> torch.dtype | None:
        return torch.float8_e4m3fn

    def attention(self, max_model_len: int) -> Attention:
        from paged.backends.cuda.kernels.attention import TritonPagedAttention

        return TritonPagedAttention(max_model_len)

    def ops(self, precision: Precision) -> dict[str, Callable[..., Any]]:
        from paged.backends.cuda.kernels import activation, fused_moe, norm, rotary
        from paged.backends.cuda.linear import GGUFLinear

        return {
            "rms_norm": norm.rms_norm,
            "add_rms_norm": norm.add_rms_norm,
            "rotary": rotary.rotary,
            "silu_and_mul": activation.silu_and_mul,
            "fused_moe": fused_moe.fused_moe,
            "linear": GGUFLinear(),
        }

    def has_fp8_units(self) -> bool:
        return torch.cuda.get_device_capability() >= (8, 9)

    def kv_cache_dtype(self, model_dtype: torch.dtype, requested: str = "auto") -> torch.dtype:
        """Triton compiles fp8 loads only for compute capability 8.9 and up (Ada, Hopper)."""
        if requested == "fp8" and not self.has_fp8_units():
            raise ValueError(f"{self.device_name()} (compute capability {torch.cuda.get_device_capability()}) "
                             "has no fp8 support in the attention kernels; it needs 8.9 or newer")
        return super().kv_cache_dtype(model_dtype, requested)

    def linear_kernel(self, form: str) -> LinearKernel | None:
        from paged.backends.common.quant_linear import Int8Linear
        from paged.backends.cuda.linear import FP8Linear, IntLinear

        kernels = {"int": IntLinear, "fp8": lambda: FP8Linear(self.has_fp8_units()), "int8": Int8Linear}
        return kernels[form]() if form in kernels else None

    def capture_graph(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Record fn on a side stream into a graph sharing one memory pool with the others captured."""
        torch.cuda.synchronize()
        fn()  # warm-up outside the graph: Triton compiles and autotunes here, not during capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            output = fn()
        torch.cuda.synchronize()

        def replay() -> Any:
            graph.replay()
            return output

        return replay
