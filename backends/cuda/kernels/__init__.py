"""Triton kernels for the CUDA backend.

Modules: attention (paged KV write, prefill and split-K decode attention), norm (RMSNorm, fused residual
add + RMSNorm), rotary (neox rotary embedding) and activation (SiLU-and-multiply). Nothing is imported
here so that importing the package does not require triton.
"""
