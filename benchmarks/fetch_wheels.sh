#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on the GPU machine, which has torch, triton and transformers but no
# network: paged's other dependencies and the GPU tests' tools, for CPython 3.12 on x86-64 Linux, at the
# versions ci/test-constraints.txt pins (the latest where it pins none), into .whl/ (carried to the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(pydantic pydantic_core annotated-types typing-inspection typing_extensions fastapi starlette anyio sniffio
  idna uvicorn h11 click stevedore prometheus_client gguf pyzmq msgspec xgrammar apache-tvm-ffi llguidance psutil
  annotated-doc compressed-tensors loguru openai httpx2 httpcore2 truststore httpx httpcore jiter certifi distro
  setuptools-scm vcs-versioning)
specs=()
for package in "${packages[@]}"; do
  pinned=$(grep -i "^${package//[-_]/[-_]}==" ci/test-constraints.txt | head -1 || true)
  specs+=("${pinned:-$package}")
done
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform any -d .whl "${specs[@]}"
