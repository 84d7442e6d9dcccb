"""What this CPU can compute, probed once at start-up: its instruction-set level and what torch's oneDNN
runs on it. The CPU backend's dtypes, kernels and linear layers all follow from this one probe, so no
path assumes an instruction set the machine lacks.

The level is the highest of an ordered list whose every instruction set the CPU reports; PAGED_CPU_ISA
caps it (`PAGED_CPU_ISA=avx2` on an AVX-512 machine runs the paths of an AVX2 one). What oneDNN says it
supports is read from torch itself, so oneDNN's own cap (ONEDNN_MAX_CPU_ISA) is honoured too.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from paged.errors import UserError

CAP_ENV = "PAGED_CPU_ISA"

# Each level needs every flag (as /proc/cpuinfo names them) of itself and of the levels below it.
X86_LEVELS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_tile"),
}
ARM_LEVELS: dict[str, tuple[str, ...]] = {
    "baseline": ("asimd",),  # NEON: part of every aarch64 CPU
    "bf16": ("bf16",),
}
# Levels at which the CPU multiplies bfloat16 in hardware: bfloat16 is then the fastest dtype.
NATIVE_BF16_LEVELS = ("avx512_bf16", "amx", "bf16")


def _levels(arch: str) -> dict[str, tuple[str, ...]]:
    return ARM_LEVELS if arch in ("aarch64", "arm64") else X86_LEVELS


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports ("flags" on x86, "Features" on Arm)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _onednn_bf16() -> bool:
    """Whether torch's oneDNN runs bfloat16 matrix products here (natively or emulated with AVX-512)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class CPUCapabilities:
    """The probe's result; `level` is what paged may use, `host_level` what the CPU has."""

    arch: str
    flags: frozenset[str]
    host_level: str
    level: str
    cap: str | None
    onednn: bool
    onednn_bf16: bool
    aten: str  # the vector ISA torch's own kernels dispatch to

    def at_least(self, level: str) -> bool:
        order = list(_levels(self.arch))
        return level in order and order.index(self.level) >= order.index(level)

    @property
    def native_bf16(self) -> bool:
        return self.level in NATIVE_BF16_LEVELS and self.onednn_bf16

    def levels_covered(self) -> list[str]:
        """This level and every one below it, lowest first: the caps that still change something here."""
        order = list(_levels(self.arch))
        return order[: order.index(self.level) + 1]

    def describe(self) -> str:
        shown = [flag for needs in _levels(self.arch).values() for flag in needs if flag in self.flags]
        capped = f", capped by {CAP_ENV}={self.cap} (the CPU has {self.host_level})" if self.cap else ""
        onednn = ("bfloat16 and float32" if self.onednn_bf16 else "float32 only") if self.onednn else "absent"
        return (f"{self.arch} level {self.level}{capped}; instruction sets: {' '.join(shown) or 'none listed'}; "
                f"oneDNN: {onednn}; torch kernels: {self.aten}")


def probe() -> CPUCapabilities:
    """This CPU's capabilities under the PAGED_CPU_ISA cap (a UserError if the cap names no level)."""
    arch = platform.machine().lower()
    levels = _levels(arch)
    flags = cpu_flags()
    host = "baseline"
    for name, needs in levels.items():
        if not all(flag in flags for flag in needs):
            break
        host = name
    cap = os.environ.get(CAP_ENV, "").strip().lower() or None
    level = host
    if cap is not None:
        if cap not in levels:
            raise UserError(f"{CAP_ENV}={cap!r} is not a level of this {arch} CPU; choose one of {', '.join(levels)}")
        order = list(levels)
        level = order[min(order.index(cap), order.index(host))]
    onednn = torch.backends.mkldnn.is_available()
    order = list(levels)
    # Below AVX-512, oneDNN has no bfloat16 path on x86 (it says so by raising, which paged must never reach).
    bf16_from = "bf16" if levels is ARM_LEVELS else "avx512"
    onednn_bf16 = _onednn_bf16() and order.index(level) >= order.index(bf16_from)
    aten = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    return CPUCapabilities(arch, flags, host, level, cap, onednn, onednn_bf16, aten)
