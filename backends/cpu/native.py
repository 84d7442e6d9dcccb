"""The CPU backend's C kernels, compiled on first use by the host's C compiler and cached.

Compiled here rather than shipped as binaries: the instructions they need are the running machine's,
and each C file, with no headers beyond the compiler's own, builds in about a second with any `cc`. A
library is named by a hash of its source and flags, so an edited kernel builds anew. Two files, each
built only where the probe (isa.py) says the CPU runs its instructions:

- kernels_bf16.c (AVX-512 BF16): bfloat16 GEMV for decoding, rms_norm and rotary on bfloat16;
- kernels_avx2.c (AVX2 + FMA): float32 linear layers over weights stored as bfloat16 or in GGUF's own
  4- and 8-bit blocks (packing.py), and float32 layer ops, for CPUs without bfloat16 arithmetic.

Without a compiler, or below a file's level, the backend keeps oneDNN and plain torch, and says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from paged.backends.common.cache import cache_dir
from paged.backends.cpu.isa import CPUCapabilities
from paged.backends.cpu.packing import PackedWeight

logger = logging.getLogger(__name__)

_COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


@dataclass(frozen=True)
class KernelFile:
    """One C file, the flags it is compiled with, and the probe level it needs."""

    name: str
    flags: tuple[str, ...]
    level: str

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(self.name)


BF16_FILE = KernelFile("kernels_bf16.c", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"), "avx512_bf16")
# No contraction into FMA: elementwise products then round as torch's do.
AVX2_FILE = KernelFile("kernels_avx2.c", ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"), "avx2")

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_NORM_SIGNATURE = ([_P, _P, _P, _P, _P, _I64, _I64, _F32, _I32], None)
_ROTARY_SIGNATURE = ([_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I32], None)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows_of_heads(t: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, head_dim] with each token's heads contiguous (the token rows may be strided, as slices
    of the fused qkv output are)."""
    return t if t.stride(-1) == 1 and t.stride(1) == t.shape[-1] else t.contiguous()


class LayerKernels:
    """rms_norm and rotary of one dtype, as both files define them (see each file for the rounding)."""

    dtype: torch.dtype
    suffix: str

    def __init__(self, library: ctypes.CDLL, signatures: dict[str, tuple[list, object]]) -> None:
        for name, (argtypes, restype) in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, restype
            setattr(self, f"_{name}", function)
        self._norm = getattr(self, f"_rms_norm_{self.suffix}")
        self._rotary = getattr(self, f"_rotary_{self.suffix}")

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(norm(h), h) with h = x + residual, or (norm(x), None) without a residual."""
        x = x.contiguous()
        out = torch.empty_like(x)
        total = None if residual is None else torch.empty_like(x)
        residual = None if residual is None else residual.contiguous()
        self._norm(x.data_ptr(), _pointer(residual), weight.data_ptr(), out.data_ptr(), _pointer(total),
                   x.shape[0], x.shape[1], eps, torch.get_num_threads())
        return out, total

    def rotary(self, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads * head_dim], rows may be strided (a slice of the fused qkv output)."""
        if x.stride(1) != 1:
            x = x.contiguous()
        head_dim = cos_sin.shape[1]
        out = torch.empty(x.shape, dtype=x.dtype)
        self._rotary(x.data_ptr(), x.stride(0), out.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(),
                     x.shape[0], x.shape[1] // head_dim, head_dim, torch.get_num_threads())
        return out


class BF16Kernels(LayerKernels):
    """kernels_bf16.c, called on contiguous bfloat16 tensors."""

    dtype, suffix = torch.bfloat16, "bf16"
    # Measured on the machines of benchmarks/RESULTS.md: from about four rows on, oneDNN's GEMM is as fast.
    gemv_max_rows = 2

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library, {"gemv_bf16": ([_P, _P, _P, _I64, _I64, _I64, _I32], ctypes.c_int),
                                   "rms_norm_bf16": _NORM_SIGNATURE, "rotary_bf16": _ROTARY_SIGNATURE})

    def gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [1..4, k] @ weight[n, k]^T."""
        x = x.contiguous()
        rows, (n, k) = x.shape[0], weight.shape
        y = torch.empty((rows, n), dtype=torch.bfloat16)
        if self._gemv_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads()):
            raise ValueError(f"gemv_bf16 takes 1 to 4 rows, not {rows}")
        return y


class AVX2Kernels(LayerKernels):
    """kernels_avx2.c, called on contiguous float32 tensors and weights packed by packing.py."""

    dtype, suffix = torch.float32, "f32"

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library, {
            "linear_packed": ([_I32, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I32], None),
            "widen_transposed": ([_I32, _P, _P, _P, _P, _I64, _I64, _I32], None),
            "rms_norm_f32": _NORM_SIGNATURE,
            "rotary_f32": _ROTARY_SIGNATURE,
            "silu_and_mul_f32": ([_P, _P, _I64, _I64, _I32], None),
            "paged_decode_f32": ([_P, _P, _I64, _P, _I64, _P, _P, _P, _P, _P] + [_I64] * 7 + [_F32, _I32], None),
            "write_kv": ([_P, _P, _I64, _P, _I64, _P] + [_I64] * 5, None),
        })
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}

    def linear(self, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty((x.shape[0], weight.n), dtype=torch.float32)
        self._linear_packed(weight.format, x.data_ptr(), weight.q.data_ptr(), _pointer(weight.d),
                            _pointer(weight.m), _pointer(bias), y.data_ptr(), x.shape[0], weight.n, weight.k,
                            torch.get_num_threads())
        return y

    # Widened weights up to this size keep their buffer for the next call of that shape: a fresh one of
    # megabytes is fresh pages from the kernel, zeroed and faulted in, which costs as much as the widening.
    SCRATCH_BYTES = 64 << 20

    def widen_transposed(self, weight: PackedWeight) -> torch.Tensor:
        """W^T as float32 [k, n], exactly the values the kernel multiplies by. It may be a buffer the next
        call of the same shape overwrites: use it before then."""
        shape = (weight.k, weight.n)
        out = self._scratch.get(shape)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
            if out.numel() * 4 <= self.SCRATCH_BYTES:
                self._scratch[shape] = out
        self._widen_transposed(weight.format, weight.q.data_ptr(), _pointer(weight.d), _pointer(weight.m),
                               out.data_ptr(), weight.n, weight.k, torch.get_num_threads())
        return out

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        inter = x.shape[-1] // 2
        out = torch.empty((x.shape[0], inter), dtype=torch.float32)
        self._silu_and_mul_f32(x.data_ptr(), out.data_ptr(), x.shape[0], inter, torch.get_num_threads())
        return out

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Store key/value [tokens, kv_heads, head_dim] (rows may be strided) at slots of the paged cache,
        any dtype: one C loop instead of an index_copy_ through torch's indexing."""
        key, value = (_rows_of_heads(t).to(kv_cache.dtype) for t in (key, value))
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        size = kv_cache.element_size()
        self._write_kv(kv_cache.data_ptr(), key.data_ptr(), key.stride(0) * size, value.data_ptr(),
                       value.stride(0) * size, slots.data_ptr(), slots.shape[0], kv_heads, head_dim * size,
                       num_blocks, block_size)

    def decode_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         meta, scale: float) -> torch.Tensor:
        """Write this step's K/V into the paged cache, then one query per sequence over its context
        (kernels_avx2.c's paged_decode_f32); key and value rows may be strided, as slices of qkv."""
        query, key, value = query.contiguous(), _rows_of_heads(key), _rows_of_heads(value)
        tables = meta.block_tables if meta.block_tables.stride(-1) == 1 else meta.block_tables.contiguous()
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        seqs, heads = query.shape[0], query.shape[1]
        out = torch.empty_like(query)
        self._paged_decode_f32(query.data_ptr(), key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
                               kv_cache.data_ptr(), meta.slot_mapping.data_ptr(), tables.data_ptr(),
                               meta.seq_lens.data_ptr(), out.data_ptr(), seqs, heads, kv_heads, head_dim, num_blocks,
                               block_size, tables.stride(0), scale, torch.get_num_threads())
        return out


def load(file: KernelFile, caps: CPUCapabilities) -> tuple[ctypes.CDLL | None, str]:
    """The compiled library of `file`, or None; and why not."""
    if not caps.at_least(file.level):
        return None, f"the CPU level is {caps.level}, below {file.level}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, f"no C compiler (set CC, or install gcc) to build {file.name}"
    try:
        return ctypes.CDLL(str(_build(file, compiler))), f"{file.name} built with {compiler}"
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return None, f"building {file.name} with {compiler} failed: {detail.strip()[:300]}"


def load_bf16_kernels(caps: CPUCapabilities) -> tuple[BF16Kernels | None, str]:
    library, why = load(BF16_FILE, caps)
    return (BF16Kernels(library) if library else None), why


def load_avx2_kernels(caps: CPUCapabilities) -> tuple[AVX2Kernels | None, str]:
    library, why = load(AVX2_FILE, caps)
    return (AVX2Kernels(library) if library else None), why


def _build(file: KernelFile, compiler: str) -> Path:
    """Compile the kernels into the cache unless a library of this source and these flags is there."""
    flags = (*_COMMON_FLAGS, *file.flags)
    digest = hashlib.sha256(file.source.read_bytes() + " ".join((compiler,) + flags).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{file.source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("compiling the CPU kernels %s with %s", file.name, compiler)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(file.source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)  # atomic: a process building at the same time finds a whole library
    return target
