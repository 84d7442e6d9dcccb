"""The ROCm backend on a machine without AMD GPUs: its facts, its probe's answer, what it shares with CUDA."""

from __future__ import annotations

import pytest
import torch

from paged.backends.cuda.backend import CUDABackend
from paged.backends.cuda.kernels.attention import TritonPagedAttention
from paged.backends.rocm import attention as rocm_attention
from paged.backends.rocm.backend import TARGET_ARCH, ROCmBackend, fp8_dtype_for


def test_is_the_cuda_backend_with_amd_facts():
    assert issubclass(ROCmBackend, CUDABackend)
    assert (ROCmBackend.torch_build, ROCmBackend.visible_devices_env, ROCmBackend.dist_backend) == (
        "rocm", "HIP_VISIBLE_DEVICES", "nccl")  # torch.distributed's name for RCCL on HIP builds
    attention = ROCmBackend().attention(4096)  # the CUDA kernels and dispatch, with AMD's tiles
    assert isinstance(attention, TritonPagedAttention)
    assert (attention.prefill_tiles, attention.decode_tiles) == (rocm_attention.prefill_config,
                                                                 rocm_attention.decode_config)


@pytest.mark.skipif(bool(getattr(torch.version, "hip", None)), reason="this torch is a HIP build")
def test_probe_names_the_torch_build():
    probe = ROCmBackend.is_available()
    assert not probe and "not a rocm one" in probe.reason


def test_fp8_follows_the_architecture():
    assert fp8_dtype_for("gfx942") == torch.float8_e4m3fnuz  # CDNA3, MI300
    assert fp8_dtype_for("gfx950") == torch.float8_e4m3fn  # CDNA4, OCP fp8
    assert fp8_dtype_for("gfx90a") is None  # CDNA2 has no fp8 arithmetic
    assert ROCmBackend.__new__(ROCmBackend).fp8_dtype() == fp8_dtype_for(TARGET_ARCH)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tiles_fit_a_wavefront(head_dim):
    """Every tile keeps each of its 64-lane wavefronts busy and stays within what the kernels accept."""
    for config in (rocm_attention.prefill_config(head_dim), rocm_attention.decode_config(head_dim)):
        assert config.block_m * config.block_n >= 64 * config.num_warps
        assert config.block_m >= 16 and config.block_n >= 16 and config.num_stages >= 1
