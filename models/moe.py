"""Mixture-of-experts layers: a router picks each token's top-k experts, and one op computes them all.

Every expert's gate/up and down projections are stacked into two 3D weights, so the backend's `fused_moe`
op sees the whole layer at once and can group a step's tokens by expert (a GEMM per expert that got tokens,
nothing for the others) instead of looping over experts in Python. Tensor parallelism splits every expert's
intermediate dimension over the ranks, as a dense MLP is split: each rank holds a slice of every expert,
computes partial sums for all routed tokens, and one all-reduce adds them. (An expert-parallel layout, whole
experts per rank with tokens sent to them, would suit many-expert models on many GPUs; it is not built.)

Quantized experts go through the quantization method of the decoder's linears: one with a form for experts
(`--quantization fp8`) has them rounded per expert and output channel once loaded, and the op computes from
the 8-bit codes and their scales, reading half the bytes of bf16 experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paged.backends.interface import Communicator
from paged.quant.base import quantize_rows


class FusedExperts(nn.Module):
    """This rank's slice of every expert: w13 [experts, 2 * slice, hidden] (gate rows, then up rows) and
    w2 [experts, hidden, slice]."""

    # checkpoint projection name -> (parameter, which half of w13), in Mixtral's and in Qwen's spelling
    parts = {"w1": ("w13_weight", 0), "gate_proj": ("w13_weight", 0), "w3": ("w13_weight", 1),
             "up_proj": ("w13_weight", 1), "w2": ("w2_weight", None), "down_proj": ("w2_weight", None)}

    def __init__(self, num_experts: int, hidden: int, intermediate: int, comm: Communicator, ops: dict) -> None:
        super().__init__()
        if intermediate % comm.world_size:
            raise ValueError(f"expert size {intermediate} is not divisible by the tensor-parallel size "
                             f"{comm.world_size}")
        method = getattr(ops["decoder_linear"], "method", None)  # the decoder linears' QuantMethod, if any
        self.quantized_to = method.expert_dtype() if method is not None else None
        if method is not None and self.quantized_to is None:
            raise ValueError(f"mixture-of-experts layers cannot take {method.describe()} experts yet: load a dense "
                             "checkpoint (with --quantization fp8 to quantize the experts too)")
        for name in ("w13_scale", "w2_scale"):  # [experts, rows] float32 once quantized
            self.register_buffer(name, None, persistent=False)
        self.comm = comm
        self.local = intermediate // comm.world_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, self.local), requires_grad=False)
        self._fused_moe = ops["fused_moe"]

    def load_expert(self, expert: int, projection: str, tensor) -> str:
        """Copy this rank's slice of one expert's checkpoint matrix into place; returns the parameter's name."""
        if projection not in self.parts:
            raise ValueError(f"expert projection {projection!r} is not one of {sorted(self.parts)}")
        name, half = self.parts[projection]
        start = self.comm.rank * self.local
        if half is None:
            self.w2_weight.data[expert].copy_(tensor.narrow(1, start, self.local))
        else:
            self.w13_weight.data[expert].narrow(0, half * self.local, self.local).copy_(
                tensor.narrow(0, start, self.local))
        return name

    def process_weights(self) -> None:
        """Once loaded, round every expert's rows to the quantization's type, each with a scale of its own."""
        if self.quantized_to is None:
            return
        for name in ("w13", "w2"):
            dense = getattr(self, f"{name}_weight")
            experts, rows, columns = dense.shape
            matrix = quantize_rows(dense.data.reshape(experts * rows, columns), self.quantized_to)
            codes = matrix.weight.view(experts, rows, columns)
            setattr(self, f"{name}_weight", nn.Parameter(codes, requires_grad=False))
            setattr(self, f"{name}_scale", matrix.scale.view(experts, rows))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self._fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                                                    self.w13_scale, self.w2_scale))


class SparseMoeBlock(nn.Module):
    """Router and experts, named as Mixtral's and Qwen's checkpoints name them (gate, experts); a
    `shared_expert` (Qwen2-MoE's always-on MLP) is added, scaled by a sigmoid gate."""

    def __init__(self, config, comm: Communicator, ops: dict, num_experts: int, intermediate: int,
                 renormalize: bool, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = renormalize
        # The router is small and replicated: every rank routes every token the same way.
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, config.hidden_size, intermediate, comm, ops)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared_expert else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, weights.to(x.dtype), ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return out
