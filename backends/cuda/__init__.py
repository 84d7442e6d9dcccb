"""NVIDIA GPUs through Triton kernels (attention, norms, rotary, activation)."""
