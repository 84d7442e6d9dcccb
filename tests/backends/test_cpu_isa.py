"""The CPU probe: levels from the flags a CPU reports, the PAGED_CPU_ISA cap, and the precision and linear
layers that `dtype="auto"` and an explicit dtype resolve to at each level."""

from __future__ import annotations

import pytest
import torch

from paged.backends.cpu import isa
from paged.backends.cpu.backend import CPUBackend
from paged.backends.cpu.linear import OneDNNLinear, PackedLinear
from paged.backends.interface import Precision
from paged.errors import UserError

ZEN3 = frozenset("fpu sse4_2 avx avx2 fma f16c bmi2".split())  # AVX2 and FMA, no AVX-512
SAPPHIRE_RAPIDS = ZEN3 | frozenset("avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile".split())


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be an x86 CPU with the given flags."""

    def pretend(flags: frozenset[str]) -> None:
        monkeypatch.setattr(isa, "cpu_flags", lambda: flags)
        monkeypatch.setattr(isa.platform, "machine", lambda: "x86_64")

    return pretend


def test_levels_follow_the_flags(machine, monkeypatch):
    monkeypatch.delenv(isa.CAP_ENV, raising=False)
    machine(ZEN3)
    assert isa.probe().level == "avx2"
    machine(SAPPHIRE_RAPIDS)
    assert isa.probe().host_level == "amx"
    machine(SAPPHIRE_RAPIDS - {"avx512_bf16"})  # a missing level stops the climb
    assert isa.probe().level == "avx512"
    machine(frozenset({"sse2"}))
    assert isa.probe().level == "baseline"


@pytest.mark.parametrize("cap", ["baseline", "avx2", "avx512"])
def test_the_cap_lowers_the_level_never_raises_it(machine, monkeypatch, cap):
    machine(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(isa.CAP_ENV, cap)
    caps = isa.probe()
    assert caps.level == cap and caps.host_level == "amx"
    assert not caps.native_bf16
    assert cap in caps.describe() and "amx" in caps.describe()
    machine(ZEN3)
    monkeypatch.setenv(isa.CAP_ENV, "amx")
    assert isa.probe().level == "avx2"


def test_a_cap_that_names_no_level_is_one_line(monkeypatch):
    monkeypatch.setenv(isa.CAP_ENV, "avx9000")
    with pytest.raises(UserError, match="PAGED_CPU_ISA='avx9000' is not a level.*avx2"):
        isa.probe()


def test_onednn_bfloat16_needs_avx512(machine, monkeypatch):
    """oneDNN raises for bfloat16 below AVX-512; the probe must never let paged get there."""
    machine(ZEN3)
    monkeypatch.setattr(isa, "_onednn_bf16", lambda: True)  # whatever torch says, the level rules it out
    assert not isa.probe().onednn_bf16


def test_arm_levels(monkeypatch):
    monkeypatch.delenv(isa.CAP_ENV, raising=False)
    monkeypatch.setattr(isa.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset("fp asimd sve".split()))
    assert isa.probe().level == "baseline"
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset("fp asimd sve bf16".split()))
    assert isa.probe().level == "bf16"


def backend_at(monkeypatch, cap: str) -> CPUBackend:
    monkeypatch.setenv(isa.CAP_ENV, cap)
    return CPUBackend()


def test_auto_without_bfloat16_arithmetic(monkeypatch):
    """On an AVX2 CPU, auto computes in float32 over bfloat16 weights: half the bytes of float32 weights."""
    host = isa.probe()
    if not host.at_least("avx2"):
        pytest.skip("the host has no AVX2")
    backend = backend_at(monkeypatch, "avx2")
    precision = backend.precision(None, torch.bfloat16)
    assert precision == Precision(torch.float32, torch.bfloat16, precision.why)
    assert isinstance(backend.ops(precision)["linear"], PackedLinear)
    assert backend.precision(None, torch.float32) == Precision(torch.float32, torch.float32, "the checkpoint's dtype")


def test_auto_at_baseline_is_float32(monkeypatch):
    backend = backend_at(monkeypatch, "baseline")
    precision = backend.precision(None, torch.bfloat16)
    assert (precision.compute, precision.weights) == (torch.float32, torch.float32)
    assert "linear" not in backend.ops(precision) or isinstance(backend.ops(precision)["linear"], OneDNNLinear)


@pytest.mark.parametrize("cap", ["baseline", "avx2"])
def test_explicit_bfloat16_without_it_runs_in_plain_torch(monkeypatch, caplog, cap):
    backend = backend_at(monkeypatch, cap)
    precision = backend.precision(torch.bfloat16, None)
    assert precision.compute == torch.bfloat16
    assert "no bfloat16 arithmetic" in caplog.text
    assert "linear" not in backend.ops(precision)  # F.linear, never oneDNN's bfloat16 path


def test_auto_with_bfloat16_arithmetic(monkeypatch):
    host = isa.probe()
    if not host.native_bf16:
        pytest.skip(f"the host is {host.level}")
    monkeypatch.delenv(isa.CAP_ENV, raising=False)
    assert CPUBackend().precision(None, torch.bfloat16).compute == torch.bfloat16


@pytest.mark.parametrize("cap", ["baseline", "avx2", None])
def test_a_gguf_of_block_types_computes_from_its_blocks_wherever_the_kernels_run(monkeypatch, cap):
    """Even where bfloat16 is native: the blocks are exact and fewer bytes (benchmarks/RESULTS.md)."""
    if cap is None:
        monkeypatch.delenv(isa.CAP_ENV, raising=False)
        backend = CPUBackend()
    else:
        backend = backend_at(monkeypatch, cap)
    precision = backend.precision(None, "Q4_1")
    if backend.caps.at_least("avx2"):
        assert precision.compute == torch.float32 and str(precision) == "float32 from GGUF Q4_1 blocks"
        assert backend.ops(precision)["linear"].block_types >= {"Q4_0", "Q4_1", "Q8_0"}
    else:
        assert precision == Precision(torch.float32, torch.float32, precision.why)
    assert backend.precision(None, "Q6_K").kept is None


def test_paged_info_shows_the_level_and_paths(monkeypatch, capsys):
    from paged.cli.main import main

    monkeypatch.setenv(isa.CAP_ENV, "baseline")
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "level baseline" in out and "dtype auto: float32" in out and "linear layers:" in out


def test_a_cpu_step_stays_short():
    """Without --max-num-batched-tokens a CPU step is about two seconds of work, not the 8,192 tokens of a GPU:
    1,024 tokens of SmolLM2-135M, never fewer than one decode token per running sequence."""
    backend = CPUBackend()
    assert backend.max_num_batched_tokens(135_000_000, 256) == 1024
    assert backend.max_num_batched_tokens(8_000_000_000, 256) == 256
    assert backend.max_num_batched_tokens(1_000_000, 256) == 8192


AVX2_MACHINE = {isa.CAP_ENV: "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_an_avx2_machine_runs_either_dtype_from_the_command_line(tmp_path, dtype):
    """As on an AVX2-only CPU (paged, oneDNN and torch all held to AVX2 in a fresh process, where oneDNN's
    bfloat16 path raises): `paged generate` answers, bfloat16 with a warning that it is slow, never a
    traceback."""
    import os
    import subprocess
    import sys

    from tests.models_factory import save_tiny_model

    save_tiny_model("llama", tmp_path)
    done = subprocess.run([sys.executable, "-m", "paged.cli.main", "generate", "w5 w6 w7", "--model", str(tmp_path),
                           "--dtype", dtype, "--max-tokens", "4", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **AVX2_MACHINE})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and done.stdout.strip()
    if dtype == "bfloat16":
        assert "no bfloat16 arithmetic" in done.stderr
    else:
        assert "dtype auto: float32" in done.stderr
