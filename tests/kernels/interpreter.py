"""Running the CUDA backend's Triton kernels on the CPU, through the Triton interpreter.

Triton picks interpreter or compiler when a function is decorated, its own library included, so the
variable must be set before triton is first imported: a kernel test module imports this one first. When
something imported triton earlier in the process (a conftest importing transformers does), the module's
tests run again in a fresh process instead (run_in_fresh_process), and are skipped in this one.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are built in interpreter mode

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
# Whether triton's own library was decorated in interpreter mode (see the module docstring).
INTERPRETED = type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="triton was imported first: see test_in_fresh_process")
compiled_process = pytest.mark.skipif(INTERPRETED, reason="this process already runs the kernels in the interpreter")


def run_in_fresh_process(test_file: str) -> None:
    """Run the tests of `test_file` in a new interpreter, where this module can set the variable in time."""
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "--noconftest"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
    print(result.stdout[-20000:], result.stderr[-5000:])
    assert result.returncode == 0, f"{Path(test_file).name} failed in the fresh process (output above)"
