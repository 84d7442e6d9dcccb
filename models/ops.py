"""Layer ops by name, each with its plain-torch version.

A backend's `ops()` returns faster versions under the same names; `bind_ops` picks them once at model
construction, so the model's forward never asks which backend it runs on. "linear" is a LinearMethod
rather than a function, since a backend may repack weights once after loading.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[tokens, hidden] -> [tokens, hidden], computed in float32 like the reference models."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the next norm: returns (rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [tokens, heads * head_dim] and key [tokens, kv_heads * head_dim] (neox layout).

    cos_sin is [max_positions, head_dim]: cos in the first half, sin in the second.
    """
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, 2 * half)
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype).view(shape)

    return rotate(query), rotate(key)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] -> [tokens, inter]: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] -> [tokens, inter]: GeGLU, gelu(gate) (tanh approximation, as Gemma's) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None
              ) -> torch.Tensor:
    """[tokens, hidden] through each token's top-k experts, weighted by topk_weights [tokens, k]: for every
    expert that got tokens, its gate/up rows w13[e] [2 * inter, hidden], silu_and_mul, and w2[e] [hidden, inter].
    The experts run in ascending order, one GEMM each over the tokens routed to it. With scales ([E, rows]
    float32), w13 and w2 hold 8-bit codes, each expert's widened to x's dtype as it runs."""
    out = torch.zeros_like(x)
    k = topk_ids.shape[1]
    order = topk_ids.flatten().argsort(stable=True)
    counts = torch.bincount(topk_ids.flatten(), minlength=w13.shape[0]).tolist()
    tokens, weights = order // k, topk_weights.flatten()[order]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = tokens[start : start + count]
            hidden = F.linear(silu_and_mul(F.linear(x[rows], _widened(w13, w13_scale, expert, x.dtype))),
                              _widened(w2, w2_scale, expert, x.dtype))
            out.index_add_(0, rows, (hidden * weights[start : start + count, None]).to(x.dtype))
            start += count
    return out


def _widened(weight: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return weight[expert]
    return (weight[expert].float() * scale[expert][:, None]).to(dtype)


class LinearMethod:
    """How a linear layer computes y = x W^T + b. A backend may repack W into its own layout once the
    checkpoint is loaded (process_weights), then compute from that layout (apply). A method that computes
    from GGUF's quantized blocks names their types in block_types: the loader then hands it those matrices
    as they are (layers.BlockLoading), not dequantized."""

    block_types: frozenset[str] = frozenset()

    def create_weights(self, layer: torch.nn.Module, outputs: int, inputs: int) -> None:
        """This rank's parameters of a layer of outputs x inputs: here the dense weight."""
        layer.weight = torch.nn.Parameter(torch.empty(outputs, inputs), requires_grad=False)

    def takes_part(self, suffix: str) -> bool:
        """Whether a checkpoint tensor "<layer>.<suffix>" is this method's to keep (a quantized format's)."""
        return False

    def process_weights(self, layer: torch.nn.Module) -> None:
        return None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def storage(self, layer: torch.nn.Module) -> str:
        """How the layer's weight is stored, for the start-up log."""
        return str(layer.weight.dtype).removeprefix("torch.")

    def weight_bytes(self, layer: torch.nn.Module) -> int:
        """Bytes the layer's weight occupies once processed, whatever layout the method chose."""
        return layer.weight.nbytes if getattr(layer, "owns_weight", True) else 0


NATIVE: dict[str, Any] = {
    "linear": LinearMethod(),
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "rotary": rotary,
    "silu_and_mul": silu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "fused_moe": fused_moe,
}


def bind_ops(faster: dict[str, Any], decoder_linear: LinearMethod | None = None) -> dict[str, Any]:
    """The op table a model uses: the backend's version where it has one, the native one otherwise.

    "decoder_linear" computes the decoder layers' projections: a quantized checkpoint's method where there is
    one, else the same as "linear" (which the LM head always uses: quantized formats leave it dense)."""
    unknown = set(faster) - set(NATIVE)
    if unknown:
        raise ValueError(f"backend offers ops no model uses: {sorted(unknown)}")
    ops = {name: faster.get(name, native) for name, native in NATIVE.items()}
    ops["decoder_linear"] = decoder_linear or ops["linear"]
    return ops
