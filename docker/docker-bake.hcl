# One image per hardware vendor, each with only that vendor's extra installed. From the repository root:
#   docker buildx bake -f docker/docker-bake.hcl                     # all five: paged:cuda, paged:rocm, ...
#   docker buildx bake -f docker/docker-bake.hcl --load cpu          # one, into the local image store
#   VERSION=0.2.0 docker buildx bake -f docker/docker-bake.hcl       # also tags paged:<vendor>-0.2.0
#   docker buildx bake -f docker/docker-bake.hcl --load cpu-conformance   # the conformance suite's image
# Paths are relative to the directory bake runs in: the repository root. The ROCm, TPU and Gaudi stacks are
# x86-64 only; CUDA and CPU build for the builder's own platform.

variable "VERSION" {
  # The project's version: setuptools-scm's fallback_version in pyproject.toml (a test keeps the two equal), or
  # the release's tag. The images' builds get it as PAGED_VERSION, since their context holds no git history.
  default = "0.1.0"
}

group "default" {
  targets = ["cuda", "rocm", "tpu", "gaudi", "cpu"]
}

# Each vendor's image plus pytest and tests/, for the compatibility-matrix CI.
group "conformance" {
  targets = ["cuda-conformance", "rocm-conformance", "tpu-conformance", "gaudi-conformance", "cpu-conformance"]
}

target "_common" {
  context = "."
  args = {
    PAGED_VERSION = "${VERSION}"
  }
  labels = {
    "org.opencontainers.image.title"    = "paged"
    "org.opencontainers.image.version"  = "${VERSION}"
    "org.opencontainers.image.licenses" = "Apache-2.0"
  }
}

target "cuda" {
  inherits   = ["_common"]
  dockerfile = "docker/Dockerfile.cuda"
  tags       = ["paged:cuda", "paged:cuda-${VERSION}"]
}

target "rocm" {
  inherits   = ["_common"]
  dockerfile = "docker/Dockerfile.rocm"
  tags       = ["paged:rocm", "paged:rocm-${VERSION}"]
  platforms  = ["linux/amd64"]
}

target "tpu" {
  inherits   = ["_common"]
  dockerfile = "docker/Dockerfile.tpu"
  tags       = ["paged:tpu", "paged:tpu-${VERSION}"]
  platforms  = ["linux/amd64"]
}

target "gaudi" {
  inherits   = ["_common"]
  dockerfile = "docker/Dockerfile.gaudi"
  tags       = ["paged:gaudi", "paged:gaudi-${VERSION}"]
  platforms  = ["linux/amd64"]
}

target "cpu" {
  inherits   = ["_common"]
  dockerfile = "docker/Dockerfile.cpu"
  tags       = ["paged:cpu", "paged:cpu-${VERSION}"]
}

# The conformance images build FROM the named context "runtime", which bake points at the vendor's target.
target "_conformance" {
  inherits   = ["_common"]
  dockerfile = "docker/conformance.Dockerfile"
  args       = { RUNTIME_IMAGE = "runtime" }
}

target "cuda-conformance" {
  inherits = ["_conformance"]
  contexts = { runtime = "target:cuda" }
  tags     = ["paged:cuda-conformance"]
}

target "rocm-conformance" {
  inherits = ["_conformance"]
  contexts = { runtime = "target:rocm" }
  tags     = ["paged:rocm-conformance"]
}

target "tpu-conformance" {
  inherits = ["_conformance"]
  contexts = { runtime = "target:tpu" }
  tags     = ["paged:tpu-conformance"]
}

target "gaudi-conformance" {
  inherits = ["_conformance"]
  contexts = { runtime = "target:gaudi" }
  tags     = ["paged:gaudi-conformance"]
}

target "cpu-conformance" {
  inherits = ["_conformance"]
  contexts = { runtime = "target:cpu" }
  tags     = ["paged:cpu-conformance"]
}
