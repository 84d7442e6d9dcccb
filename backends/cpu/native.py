"""The CPU backend's C kernels (kernels_bf16.c), compiled on first use by the host's C compiler and cached.

Compiled here rather than shipped as a binary: the instructions they need (AVX-512 BF16) are the running
machine's, and one C file with no headers beyond the compiler's own builds in about a second with any
`cc`. The library is named by a hash of its source and flags, so an edited kernel builds anew. Without a
compiler, or on a CPU without those instructions, the backend keeps oneDNN and plain torch, and says why.

They serve bfloat16 only; float32 models run the plain-torch ops, which the tests hold to transformers'
exact tokens.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from paged.backends.common.cache import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels_bf16.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Kernels:
    """The compiled kernels, called on contiguous bfloat16 tensors (see kernels_bf16.c for each one's math)."""

    # Measured on the machines of benchmarks/RESULTS.md: from about four rows on, oneDNN's GEMM is as fast.
    gemv_max_rows = 2

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        signatures = {
            "gemv_bf16": ([p, p, p, i64, i64, i64, i32], ctypes.c_int),
            "rms_norm_bf16": ([p, p, p, p, p, i64, i64, f32, i32], None),
            "rotary_bf16": ([p, i64, p, p, p, i64, i64, i64, i32], None),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, restype
            setattr(self, f"_{name}", function)
        self._threads = torch.get_num_threads()

    def gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [1..4, k] @ weight[n, k]^T."""
        x = x.contiguous()
        rows, (n, k) = x.shape[0], weight.shape
        y = torch.empty((rows, n), dtype=torch.bfloat16)
        if self._gemv_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, n, k, self._threads):
            raise ValueError(f"gemv_bf16 takes 1 to 4 rows, not {rows}")
        return y

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(norm(h), h) with h = x + residual, or (norm(x), None) without a residual."""
        x = x.contiguous()
        out = torch.empty_like(x)
        total = None if residual is None else torch.empty_like(x)
        residual = None if residual is None else residual.contiguous()
        self._rms_norm_bf16(x.data_ptr(), _pointer(residual), weight.data_ptr(), out.data_ptr(), _pointer(total),
                            x.shape[0], x.shape[1], eps, self._threads)
        return out, total

    def rotary(self, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads * head_dim], rows may be strided (a slice of the fused qkv output)."""
        if x.stride(1) != 1:
            x = x.contiguous()
        head_dim = cos_sin.shape[1]
        out = torch.empty(x.shape, dtype=x.dtype)
        self._rotary_bf16(x.data_ptr(), x.stride(0), out.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(),
                          x.shape[0], x.shape[1] // head_dim, head_dim, self._threads)
        return out


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_kernels() -> tuple[Kernels | None, str]:
    """The kernels, or None; and a sentence saying which and why."""
    fallback = "oneDNN and plain torch only"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return None, f"{fallback}: the CPU lacks {', '.join(missing)}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, f"{fallback}: no C compiler (set CC, or install gcc) to build {SOURCE.name}"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return None, f"{fallback}: building {SOURCE.name} with {compiler} failed: {detail.strip()[:300]}"
    return Kernels(library), (f"AVX-512 BF16 kernels for bfloat16 layer ops and for linear layers of up to "
                              f"{Kernels.gemv_max_rows} rows, oneDNN above")


def _build(compiler: str) -> Path:
    """Compile the kernels into the cache unless a library of this source and these flags is there."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler,) + FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{SOURCE.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("compiling the CPU kernel %s with %s", SOURCE.name, compiler)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(built, target)  # atomic: a process building at the same time finds a whole library
    return target
