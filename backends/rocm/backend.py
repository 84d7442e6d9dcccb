"""AMD GPUs: a HIP build of torch exposes them as "cuda" devices, so this is the CUDA backend with AMD facts.

Everything whose logic is the same is inherited: the probe (which checks `torch.version.hip` through
the `torch_build` class attribute), memory queries, graphs (HIP graphs behind torch.cuda.graph) and the
Triton norm/rotary/activation kernels. What differs: the visible-devices variable, the attention tiles
for 64-lane wavefronts, and CDNA3's fp8 format. Collectives go through RCCL, which torch.distributed
names "nccl" on ROCm builds, so the inherited communicator is already right.
"""

from __future__ import annotations

import torch

from paged.backends.cuda.backend import CUDABackend
from paged.backends.interface import Attention, LinearKernel

# CDNA3 (MI300) computes in the "fnuz" fp8 variant (no negative zero, bias 8); CDNA4 and RDNA4 use OCP's.
_FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")
_OCP_FP8_ARCHS = ("gfx950", "gfx1200", "gfx1201")
# The architecture the tiles are written for, and the one declared facts describe where no AMD GPU is visible.
TARGET_ARCH = "gfx942"


class ROCmBackend(CUDABackend):
    name = "rocm"
    torch_build = "rocm"
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    # The Triton int kernels are vendor-neutral; FP8 checkpoints (OCP e4m3fn) would need converting to CDNA3's
    # fnuz variant first, which is not written, so FP8 weights and FP8 KV caches are not offered here.
    supported_quantizations = ("gguf", "awq", "gptq")
    supported_kv_cache_dtypes = ("auto",)

    def fp8_dtype(self) -> torch.dtype | None:
        return fp8_dtype_for(device_arch() or TARGET_ARCH)

    def linear_kernel(self, form: str) -> LinearKernel | None:
        return super().linear_kernel(form) if form == "int" else None

    def attention(self, max_model_len: int) -> Attention:
        from paged.backends.cuda.kernels.attention import TritonPagedAttention
        from paged.backends.rocm.attention import decode_config, prefill_config

        return TritonPagedAttention(max_model_len, prefill_config, decode_config)


def device_arch() -> str | None:
    """The current AMD GPU's architecture ("gfx942"), or None without a HIP build and a device."""
    if not getattr(torch.version, "hip", None) or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName.split(":")[0]


def fp8_dtype_for(arch: str) -> torch.dtype | None:
    """The fp8 type AMD GPU `arch` (e.g. "gfx942") computes in; None where it has no fp8 arithmetic."""
    if arch in _FNUZ_ARCHS:
        return torch.float8_e4m3fnuz
    if arch in _OCP_FP8_ARCHS:
        return torch.float8_e4m3fn
    return None
