"""Tiny quantized Llama checkpoints in the on-disk layouts real quantizers write, each with a dense float32 twin.

The loaders under test read these folders; the twins say what they must compute. Both are written here from the
public descriptions of each format, never from the engine's own loader code, so that a misreading on either side
shows up as a mismatch instead of cancelling out.

`write_quantized(folder, fmt, seed, **options)` builds one random float32 LlamaForCausalLM (`tiny_float_model`),
quantizes its decoder linears (q/k/v/o/gate/up/down proj; embeddings, norms and lm_head stay float32, as the real
tools leave lm_head alone) with plain round-to-nearest min-max scales, and writes

- `folder/"quantized"`: config.json with the format's `quantization_config`, model.safetensors, tokenizer files;
- `folder/"dense"`: the same model saved by transformers in float32, each quantized linear weight replaced by the
  exact value the format defines for the stored numbers, evaluated in float32, and no `quantization_config`.

For weight-only formats (awq, gptq, ct-w4a16, ct-w8a16) a correct loader of the quantized folder computes exactly what
the twin computes. For formats that also quantize activations (ct-fp8, ct-int8, and fp8 with either
activation_scheme) the twin holds only the dequantized weights: rounding activations at run time, dynamically or
against a static input_scale, is not something a dense checkpoint can express, so there the two agree only up to
the activation rounding. Likewise the KV-cache scales written with `kv_scales=True` have no
dense counterpart; the twin leaves them out.

Written with the compressed-tensors library (its QuantizationConfig / apply_quantization_config / calculate_qparams /
ModelCompressor, the path llm-compressor takes when it saves): "ct-w4a16", "ct-w8a16", "ct-fp8", "ct-int8".
Only the scale statistics (min/max of weights, and of calibration activations for static input scales) are computed
here, as llm-compressor's min-max observers would. One gap: compressed-tensors 0.20.1 looks for a `past_key_values`
argument to recognise an attention module, and transformers 5's attention takes `cache`, so the library's
apply_quantization_config silently skips `kv_cache_scheme`; the k/v scales are therefore registered with the
library's own `initialize_hooked_kv_cache` + `initialize_attn_qparams` and the scheme added to the library's config.

Written by hand, from these public descriptions:

- "awq": AutoAWQ (casper-hansen/AutoAWQ) GEMM layout: `WQLinear_GEMM.from_linear` (awq/modules/linear/gemm.py) for
  qweight/qzeros/scales and the [0, 2, 4, 6, 1, 3, 5, 7] nibble order, `pseudo_quantize_tensor`
  (awq/quantize/quantizer.py) for the asymmetric min-max zero point, `AwqConfig.to_transformers_dict`
  (awq/models/_config.py) and `save_quantized` (awq/models/base.py) for config.json, generation_config and
  model.safetensors. Dequantization is (q - zero) * scale, as vLLM's AWQ kernels and its AWQ_REVERSE_ORDER unpack it.
- "gptq": AutoGPTQ 0.7 (AutoGPTQ/AutoGPTQ), checkpoint_format "gptq" (v1): `QuantLinear.pack`
  (auto_gptq/nn_modules/qlinear) for qweight packed along the input dim, qzeros storing zero - 1, float16 scales and
  int32 g_idx; `Quantizer.find_params` (auto_gptq/quantization/quantizer.py) for the min-max scale and zero, with
  zero = 2**(bits-1) when symmetric; `GPTQ.fasterquant` (auto_gptq/quantization/gptq.py) for act order: columns are
  visited by descending Hessian diagonal of the layer's input, groups are cut along that order, and
  g_idx[k] = (position of input k in that order) // group_size; `BaseQuantizeConfig.to_dict` and `save_quantized`
  (auto_gptq/modeling/_base.py) for config.json, quantize_config.json and the safetensors metadata.
- "fp8": AutoFP8 (neuralmagic/AutoFP8) as vLLM's "fp8" quantization method reads it: `per_tensor_quantize`
  (auto_fp8/quantize.py) for float8_e4m3fn weights with a float32 per-tensor scalar weight_scale (and input_scale
  when static), `save_quantized_model` for the config ({"quant_method": "fp8", "activation_scheme",
  "ignored_layers"}, plus "kv_cache_scheme": "static" with k_scale/v_scale on self_attn).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.models_factory import SHAPE, word_tokenizer

# hidden 256 and intermediate 384 give 2 and 3 groups of 128 (384 is no multiple of 256), and k/v come out at
# 128 rows (2 KV heads of 64), so group and packing arithmetic cannot pass by symmetry. The initializer range is
# SHAPE's scaled by sqrt(64 / 256), keeping attention as sharp as the other tiny models' at four times the width.
QUANT_SHAPE: dict[str, Any] = {**SHAPE, "hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
                               "initializer_range": 0.125}

# The decoder linears each format quantizes, relative to model.layers.N.
LINEARS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears with the same key read the same activation, hence see the same GPTQ Hessian and share one act order.
INPUT_OF: dict[str, str] = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
                            "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp",
                            "mlp.down_proj": "mlp_act"}
FORMATS: tuple[str, ...] = ("awq", "gptq", "ct-w4a16", "ct-w8a16", "ct-fp8", "ct-int8", "fp8")

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
FP8 = torch.float8_e4m3fn
CALIBRATION_SHAPE = (4, 64)  # sequences x tokens run through the float model for act order and static scales


def tiny_float_model(seed: int, **overrides: Any) -> LlamaForCausalLM:
    """The float32 model `write_quantized(..., seed, overrides=...)` starts from, rebuilt bit for bit from the seed.

    The tokenizer is models_factory's fixed 512-word one, so overrides should leave vocab_size at 512 or above.
    """
    config = LlamaConfig(**{**QUANT_SHAPE, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def kv_scale_values(layer: int) -> tuple[float, float]:
    """(k_scale, v_scale) stored for decoder layer `layer`: powers of two, different per layer and per K/V, so a
    loader that swaps them or reads one layer's for another's shows it, and scaling by them is exact."""
    return 0.5 / 2 ** layer, 2.0 * 2 ** layer


def linear_names(model: LlamaForCausalLM) -> list[str]:
    """Full module names of the quantized linears, in checkpoint order."""
    return [f"model.layers.{i}.{name}" for i in range(model.config.num_hidden_layers) for name in LINEARS]


def write_quantized(folder: Path, fmt: str, seed: int, **options: Any) -> tuple[Path, Path]:
    """(quantized checkpoint folder, dense twin folder)

    They are `folder/"quantized"` and `folder/"dense"`; see the module docstring for what the twin does and does not
    capture (activation quantization and KV-cache scales have no dense form).

    Options for every format: `kv_scales` (bool, default False) also stores float32 k_scale/v_scale per layer
    (`kv_scale_values`) on each self_attn; `overrides` (dict) replaces entries of QUANT_SHAPE. Per format:

    - "awq": group_size 32 / 64 / 128 (default 128).
    - "gptq": bits 4 / 8 (default 4), group_size 32 / 64 / 128 / -1 (default 128), sym (default True),
      desc_act (default False).
    - "ct-w4a16", "ct-w8a16": group_size (default 128; -1 for per channel), symmetric (default True),
      actorder (None or "weight": compressed-tensors 0.20.1 refuses the g_idx-producing "group" order, and
      "weight" changes only calibration, not the layout), scale_dtype (stored scale dtype, default float32 as for a
      float32 model; bfloat16 or float16 give what a half-precision model would store).
    - "ct-fp8": strategy "channel" / "tensor" for weights (default "channel"), activation_scheme "dynamic"
      (FP8_DYNAMIC: per-token dynamic inputs, the default) or "static" (FP8: per-tensor static input_scale),
      scale_dtype.
    - "ct-int8": scale_dtype (the W8A8 preset: int8 per-channel weights, dynamic per-token int8 inputs).
    - "fp8": activation_scheme "dynamic" (default) or "static".
    """
    if fmt not in _WRITERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    kv_scales = bool(options.pop("kv_scales", False))
    with single_threaded():
        model = tiny_float_model(seed, **options.pop("overrides", {}))
        calibration = _calibrate(model, seed)
        twin = copy.deepcopy(model)
        quant_dir, dense_dir = Path(folder) / "quantized", Path(folder) / "dense"
        quant_dir.mkdir(parents=True, exist_ok=True)
        dense = _WRITERS[fmt](model, quant_dir, calibration, kv_scales, **options)
        word_tokenizer().save_pretrained(quant_dir)

        modules = dict(twin.named_modules())
        with torch.no_grad():
            for name, weight in dense.items():
                modules[name].weight.copy_(weight)
        twin.save_pretrained(dense_dir)
        word_tokenizer().save_pretrained(dense_dir)
    return quant_dir, dense_dir


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread for the block: on these tiny tensors thread hand-off costs far more than the work
    (an order of magnitude on a 2-core runner), and the previous setting comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----- calibration ----- #


class _Calibration:
    """Per-linear input statistics from one float forward pass: what GPTQ's Hessian and static observers see."""

    def __init__(self) -> None:
        self.minimum: dict[str, torch.Tensor] = {}
        self.maximum: dict[str, torch.Tensor] = {}
        self.sum_sq: dict[str, torch.Tensor] = {}

    def act_order(self, name: str) -> torch.Tensor:
        """GPTQ's column order for a linear: descending Hessian diagonal (sum of squared inputs per channel).

        Keyed by the activation the linear reads, so q/k/v (and gate/up) get one shared order even if their
        statistics were not bit-identical; the sort is stable so ties cannot split them either.
        """
        layer, _, sub = name.removeprefix("model.layers.").partition(".")
        first = next(n for n in LINEARS if INPUT_OF[n] == INPUT_OF[sub])
        diag = self.sum_sq[f"model.layers.{layer}.{first}"]
        return torch.argsort(diag, descending=True, stable=True)


def _calibrate(model: LlamaForCausalLM, seed: int) -> _Calibration:
    """Run random tokens through the float model, recording each decoder linear's input statistics."""
    stats = _Calibration()
    modules = dict(model.named_modules())
    handles = []

    def hook(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            stats.minimum[name], stats.maximum[name] = x.min(), x.max()
            stats.sum_sq[name] = (x * x).sum(0)
        return record

    for name in linear_names(model):
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(3, model.config.vocab_size, CALIBRATION_SHAPE, generator=generator)
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return stats


# ----- shared pieces of the hand-written formats ----- #


def _pack_int32(values: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack unsigned `bits`-wide integers along the last dim, 32 // bits to an int32, lowest bits first.

    Field i of each word holds element `order[i]` of its run (AWQ interleaves; GPTQ keeps the natural order).
    Words are built in int64 and wrapped to int32 two's complement, as numpy's uint32 -> int32 cast does in the
    reference packers, so a top field >= 8 turns the word negative exactly as in real checkpoints.
    """
    per = 32 // bits
    if values.shape[-1] % per:
        raise ValueError(f"{values.shape[-1]} values do not pack into whole int32 words of {per}")
    if int(values.min()) < 0 or int(values.max()) >= 1 << bits:
        raise ValueError(f"values outside the unsigned {bits}-bit range")
    runs = values.to(torch.int64).unflatten(-1, (-1, per))
    if order is not None:
        runs = runs[..., list(order)]
    words = (runs << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _base_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The float tensors every format keeps as they are: all but the quantized linears' weights."""
    quantized = {f"{name}.weight" for name in linear_names(model)}
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in quantized}


def _scalar_kv_scales(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """k_scale/v_scale as 0-dim float32 tensors on each self_attn, where AutoFP8 (and vLLM after it) puts them."""
    tensors = {}
    for layer in range(model.config.num_hidden_layers):
        k, v = kv_scale_values(layer)
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k, dtype=torch.float32)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v, dtype=torch.float32)
    return tensors


def _save_config(model: LlamaForCausalLM, folder: Path, quantization_config: dict[str, Any]) -> None:
    """Write config.json with `quantization_config` added, as the tools do by setting it on the model config.

    `architectures` and `dtype` are filled in as model.save_pretrained would: the tools quantize a model loaded from
    a checkpoint whose config already has them, and loaders pick the model class by the first.
    """
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = model.dtype
    config.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization_config
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _weights(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The float weights to quantize, by module name: what every writer's round-to-nearest starts from."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().float() for name in linear_names(model)}


# ----- AWQ (AutoAWQ GEMM) ----- #


def _write_awq(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
               group_size: int = 128) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [in, out/8], qzeros [in/G, out/8] (both interleaved), scales fp16 [in/G, out]."""
    if group_size <= 0:
        raise ValueError("AutoAWQ GEMM needs a positive group_size")
    tensors, dense = _base_tensors(model), {}
    for name, weight in _weights(model).items():
        out_features, in_features = weight.shape
        if in_features % group_size or out_features % 8:
            raise ValueError(f"{name}: {tuple(weight.shape)} does not fit AWQ's group {group_size} / 8-wide packing")
        groups = weight.unflatten(1, (-1, group_size))  # [out, in/G, G]
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low).clamp(min=1e-5) / 15).half().float()  # stored fp16, so quantize against that value
        zero = (-torch.round(low / scale)).clamp(0, 15)
        q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
        dense[name] = ((q - zero[..., None]) * scale[..., None]).flatten(1)
        tensors[f"{name}.qweight"] = _pack_int32(q.flatten(1).t(), 4, AWQ_ORDER)
        tensors[f"{name}.qzeros"] = _pack_int32(zero.t(), 4, AWQ_ORDER)
        tensors[f"{name}.scales"] = scale.t().half().contiguous()
    if kv_scales:
        tensors.update(_scalar_kv_scales(model))
    _save_config(model, folder, {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4,
                                 "version": "gemm", "modules_to_not_convert": None})
    model.generation_config.do_sample = True  # AutoAWQ's save_quantized sets it before saving
    model.generation_config.save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return dense


# ----- GPTQ (AutoGPTQ, checkpoint_format "gptq") ----- #


def _write_gptq(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
                bits: int = 4, group_size: int = 128, sym: bool = True,
                desc_act: bool = False) -> dict[str, torch.Tensor]:
    """AutoGPTQ v1: qweight [in*bits/32, out], qzeros [groups, out*bits/32] holding zero - 1, scales fp16
    [groups, out], g_idx int32 [in]."""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    if group_size != -1 and group_size <= 0:
        raise ValueError("group_size must be positive or -1")
    maxq = (1 << bits) - 1
    per = 32 // bits
    tensors, dense = _base_tensors(model), {}
    for name, weight in _weights(model).items():
        out_features, in_features = weight.shape
        size = in_features if group_size == -1 else group_size
        if in_features % size or in_features % per or out_features % per:
            raise ValueError(f"{name}: {tuple(weight.shape)} does not fit group {size} / {per}-wide packing")
        order = calibration.act_order(name) if desc_act else torch.arange(in_features)
        position = torch.empty_like(order)
        position[order] = torch.arange(in_features)
        g_idx = position // size

        # Group statistics over the columns in quantization order, as fasterquant cuts them.
        groups = weight[:, order].unflatten(1, (-1, size))  # [out, groups, size]
        low = groups.amin(-1).clamp(max=0)
        high = groups.amax(-1).clamp(min=0)
        if sym:
            high = torch.maximum(low.abs(), high)
            low = torch.where(low < 0, -high, low)
        both_zero = (low == 0) & (high == 0)
        low, high = torch.where(both_zero, -1.0, low), torch.where(both_zero, 1.0, high)
        scale32 = (high - low) / maxq
        if sym:
            zero = torch.full_like(scale32, (maxq + 1) // 2)
        else:
            # v1 stores zero - 1, which cannot hold a zero of 0 (AutoGPTQ's uint32 arithmetic would smear -1 over
            # the whole word); min-max groups straddling 0 essentially never round to it, and clamping keeps the
            # checkpoint well-formed if one does.
            zero = torch.round(-low / scale32).clamp(1, maxq)
        scale = scale32.half().float()

        # Per input column: its group's scale and zero, the rows being output features.
        col_scale, col_zero = scale[:, g_idx], zero[:, g_idx]  # [out, in]
        q = (torch.round(weight / col_scale) + col_zero).clamp(0, maxq)
        dense[name] = (q - col_zero) * col_scale
        tensors[f"{name}.qweight"] = _pack_int32(q, bits).t().contiguous()  # [in/per, out]
        tensors[f"{name}.qzeros"] = _pack_int32((zero - 1).t(), bits)  # [groups, out/per]
        tensors[f"{name}.scales"] = scale.t().half().contiguous()
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
    if kv_scales:
        tensors.update(_scalar_kv_scales(model))
    quantize_config = {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
                       "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
                       "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}
    _save_config(model, folder, quantize_config)
    (folder / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2))
    metadata = {"format": "pt", "auto_gptq_version": "0.7.1", "gptq_bits": str(bits),
                "gptq_group_size": str(group_size), "gptq_desc_act": str(desc_act), "gptq_damp_percent": "0.01",
                "gptq_checkpoint_format": "gptq", "gptq_quant_method": "gptq"}
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    return dense


# ----- plain fp8 (AutoFP8) ----- #


def _fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoFP8's per-tensor rounding: multiply by max / absmax, saturate, cast; keep the reciprocal as the scale."""
    finfo = torch.finfo(FP8)
    scale = finfo.max / x.abs().max().clamp(min=1e-12)
    return (x * scale).clamp(min=finfo.min, max=finfo.max).to(FP8), scale.float().reciprocal()


def _write_fp8(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
               activation_scheme: str = "dynamic") -> dict[str, torch.Tensor]:
    """AutoFP8: weight float8_e4m3fn [out, in], weight_scale float32 [], input_scale float32 [] when static."""
    if activation_scheme not in ("dynamic", "static"):
        raise ValueError("activation_scheme must be 'dynamic' or 'static'")
    finfo = torch.finfo(FP8)
    tensors, dense = _base_tensors(model), {}
    for name, weight in _weights(model).items():
        qweight, weight_scale = _fp8_per_tensor(weight)
        dense[name] = qweight.float() * weight_scale
        tensors[f"{name}.weight"] = qweight
        tensors[f"{name}.weight_scale"] = weight_scale
        if activation_scheme == "static":
            absmax = torch.maximum(calibration.minimum[name].abs(), calibration.maximum[name].abs())
            tensors[f"{name}.input_scale"] = (finfo.max / absmax.clamp(min=1e-12)).float().reciprocal()
    config: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": activation_scheme,
                              "ignored_layers": ["lm_head"]}
    if kv_scales:
        tensors.update(_scalar_kv_scales(model))
        config["kv_cache_scheme"] = "static"
    _save_config(model, folder, config)
    model.generation_config.save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return dense


# ----- compressed-tensors (written by the library) ----- #
# The library is imported inside these writers: it is not a declared dependency of the package, and the
# hand-written formats above must keep working without it.


def _ct_int_args(bits: int, group_size: int, symmetric: bool, actorder: str | None) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", strategy="channel", symmetric=symmetric, dynamic=False,
                                actorder=actorder)
    return QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=group_size,
                            symmetric=symmetric, dynamic=False, actorder=actorder)


def _write_ct_w4a16(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
                    group_size: int = 128, symmetric: bool = True, actorder: str | None = None,
                    scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """pack-quantized int4: weight_packed int32 [out, in/8], weight_scale [out, groups], weight_shape int64 [2],
    weight_zero_point int32 [out/8, groups] when asymmetric."""
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=_ct_int_args(4, group_size, symmetric, actorder))
    return _write_ct(model, folder, calibration, kv_scales, scheme, scale_dtype)


def _write_ct_w8a16(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
                    group_size: int = 128, symmetric: bool = True, actorder: str | None = None,
                    scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """pack-quantized int8 (the library packs 8-bit weight-only too): weight_packed int32 [out, in/4]."""
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=_ct_int_args(8, group_size, symmetric, actorder))
    return _write_ct(model, folder, calibration, kv_scales, scheme, scale_dtype)


def _write_ct_fp8(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
                  strategy: str = "channel", activation_scheme: str = "dynamic",
                  scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """float-quantized: weight float8_e4m3fn [out, in], weight_scale [out, 1] (channel) or [1] (tensor),
    input_scale [1] when static."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if strategy not in ("channel", "tensor"):
        raise ValueError("strategy must be 'channel' or 'tensor'")
    presets = {"dynamic": "FP8_DYNAMIC", "static": "FP8"}
    if activation_scheme not in presets:
        raise ValueError("activation_scheme must be 'dynamic' or 'static'")
    preset = preset_name_to_scheme(presets[activation_scheme], ["Linear"])
    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=preset.input_activations)
    return _write_ct(model, folder, calibration, kv_scales, scheme, scale_dtype)


def _write_ct_int8(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, *,
                   scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """int-quantized W8A8: weight int8 [out, in], weight_scale [out, 1]; inputs quantized per token at run time."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    return _write_ct(model, folder, calibration, kv_scales, scheme, scale_dtype)


def _observed_range(weight: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the elements each scale covers, shaped as the library's scale parameter expects."""
    if args.strategy == "tensor":
        return weight.amin(), weight.amax()
    if args.strategy == "channel":
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    groups = weight.unflatten(-1, (-1, args.group_size))
    return groups.amin(-1), groups.amax(-1)


def _write_ct(model: LlamaForCausalLM, folder: Path, calibration: _Calibration, kv_scales: bool, scheme: Any,
              scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Quantize and save through compressed-tensors the way llm-compressor does, then decode the saved file."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.modeling import initialize_hooked_kv_cache
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.initialize import initialize_attn_qparams
    from compressed_tensors.quantization.utils import KV_CACHE_TARGETS, calculate_qparams

    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_names(model):
            module = modules[name]
            args = module.quantization_scheme.weights
            scale, zero_point = calculate_qparams(*_observed_range(module.weight.float(), args), args)
            module.weight_scale.data = scale.to(scale_dtype)
            if not args.symmetric:
                module.weight_zero_point.data.copy_(zero_point)
            inputs = module.quantization_scheme.input_activations
            if inputs is not None and not inputs.dynamic:
                scale, _ = calculate_qparams(calibration.minimum[name].reshape(1),
                                             calibration.maximum[name].reshape(1), inputs)
                module.input_scale.data = scale.to(scale_dtype)
            module.quantization_status = QuantizationStatus.FROZEN
    # Read the config off the model while only the linears carry schemes: from_pretrained_model, too, fails to see
    # transformers 5's attention as a KV cache (see the module docstring) and would list its scheme as a config group.
    compressor = ModelCompressor.from_pretrained_model(model)
    if kv_scales:
        kv_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
        for layer in range(model.config.num_hidden_layers):
            attention = modules[f"model.layers.{layer}.self_attn"]
            attention.quantization_scheme = QuantizationScheme(targets=KV_CACHE_TARGETS, input_activations=kv_args)
            initialize_hooked_kv_cache(model, attention)
            initialize_attn_qparams(attention, attention.quantization_scheme, force_zero_point=False)
            k, v = kv_scale_values(layer)
            attention.k_scale.data.fill_(k)
            attention.v_scale.data.fill_(v)
            attention.quantization_status = QuantizationStatus.FROZEN
        compressor.quantization_config.kv_cache_scheme = kv_args
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return _decode_ct(load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text()),
                      linear_names(model))


def _unpack_ct(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' dense packing, read as a bit stream: element i of a row is bits [i*bits, (i+1)*bits)
    of the row's little-end-first int32 words, stored with an offset of 2**(bits-1)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    stream = (words[..., None] >> torch.arange(32)) & 1  # [rows, words, 32]
    stream = stream.flatten(-2)[..., :count * bits].unflatten(-1, (count, bits))
    values = (stream << torch.arange(bits)).sum(-1)
    return values - (1 << (bits - 1))


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast a tensor / channel / group scale (or zero point) to the weight's [out, in]."""
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(shape)
    return scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)


def _decode_ct(tensors: dict[str, torch.Tensor], config: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
    """Dense float32 weights from a compressed-tensors file: (q - zero_point) * scale, per the config's scheme."""
    (group,) = [g for g in config["quantization_config"]["config_groups"].values() if "Linear" in g["targets"]]
    bits, fmt = group["weights"]["num_bits"], group["format"]
    dense = {}
    for name in names:
        scale = tensors[f"{name}.weight_scale"].float()
        if fmt == "pack-quantized":
            out_features, in_features = (int(x) for x in tensors[f"{name}.weight_shape"])
            q = _unpack_ct(tensors[f"{name}.weight_packed"], bits, in_features).float()
            zero_point = tensors.get(f"{name}.weight_zero_point")
            if zero_point is not None:
                zero_point = _unpack_ct(zero_point.t(), bits, out_features).t().float()
        elif fmt in ("int-quantized", "float-quantized"):
            q = tensors[f"{name}.weight"].float()
            zero_point = tensors.get(f"{name}.weight_zero_point")
        else:
            raise ValueError(f"unexpected compressed-tensors format {fmt!r}")
        if zero_point is not None:
            q = q - _expand(zero_point.float(), q.shape)
        dense[name] = q * _expand(scale, q.shape)
    return dense


_WRITERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "awq": _write_awq, "gptq": _write_gptq, "ct-w4a16": _write_ct_w4a16, "ct-w8a16": _write_ct_w8a16,
    "ct-fp8": _write_ct_fp8, "ct-int8": _write_ct_int8, "fp8": _write_fp8,
}
