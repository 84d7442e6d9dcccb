"""The reference quantized checkpoints (tests/quant_checkpoints.py) decode, by other hands, to their dense twins.

Each format is read back by decoders that share no code with the writer: compressed-tensors' own decompressors for
the ct-* formats (directly, and through transformers' compressed-tensors loader), its AutoAWQ converter for AWQ and
its float dequantization for fp8, and for AWQ / GPTQ / fp8 unpackers written here another way (bytes and nibbles
where the writer shifts words, bit-by-bit Python for spot checks, e4m3 decoded from its bit fields). The twin must
equal every decoding exactly, and must differ from the float model by no more than the format's rounding bound.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.quant_checkpoints import (
    FORMATS,
    INPUT_OF,
    LINEARS,
    kv_scale_values,
    linear_names,
    single_threaded,
    tiny_float_model,
    write_quantized,
)

SEED = 3
CASES: list[tuple[str, dict[str, Any]]] = [
    ("awq", {"group_size": 32}),
    ("awq", {"group_size": 64}),
    ("awq", {"group_size": 128, "kv_scales": True}),
    ("gptq", {"bits": 4, "group_size": 128, "sym": True}),
    ("gptq", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "kv_scales": True}),
    ("gptq", {"bits": 4, "group_size": -1, "sym": False}),
    ("gptq", {"bits": 8, "group_size": 64, "sym": True, "desc_act": True}),
    ("gptq", {"bits": 8, "group_size": -1, "sym": False, "desc_act": True}),
    ("gptq", {"bits": 4, "group_size": 64, "sym": False, "desc_act": True,
              "overrides": {"intermediate_size": 640, "num_hidden_layers": 3}}),
    ("ct-w4a16", {"group_size": 128}),
    ("ct-w4a16", {"group_size": 64, "symmetric": False, "kv_scales": True}),
    ("ct-w4a16", {"group_size": 64, "actorder": "weight", "scale_dtype": torch.bfloat16}),
    ("ct-w8a16", {}),
    ("ct-w8a16", {"group_size": -1, "symmetric": False}),
    ("ct-fp8", {}),
    ("ct-fp8", {"strategy": "tensor", "scale_dtype": torch.bfloat16}),
    ("ct-fp8", {"activation_scheme": "static", "kv_scales": True}),
    ("ct-int8", {}),
    ("fp8", {}),
    ("fp8", {"activation_scheme": "static", "kv_scales": True}),
]
IDS = [fmt + "".join(f"-{k}={v}".replace("torch.", "").replace(" ", "") for k, v in opts.items())
       for fmt, opts in CASES]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of a run of 8 sits in nibble AWQ_REVERSE_ORDER[c] (vLLM)
SPOT_CHECKS = 48  # elements per matrix decoded bit by bit in plain Python


class Written:
    """One written case, its files read back once."""

    def __init__(self, root: Path, fmt: str, options: dict[str, Any]) -> None:
        self.fmt, self.options = fmt, options
        self.quantized, self.dense = write_quantized(root, fmt, SEED, **dict(options))
        self.config = json.loads((self.quantized / "config.json").read_text())
        self.qconfig = self.config["quantization_config"]
        self.tensors = load_file(self.quantized / "model.safetensors")
        with safe_open(self.quantized / "model.safetensors", "pt") as f:
            self.metadata = f.metadata()
        self.twin = load_file(self.dense / "model.safetensors")
        model = tiny_float_model(SEED, **options.get("overrides", {}))
        self.original = {k: v.detach() for k, v in model.state_dict().items()}
        self.names = linear_names(model)

    @cached_property
    def decoded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The format's independent decoding, name -> (weight, per-element scale); two tests read it."""
        return DECODERS[self.fmt](self)

    def module(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one module, keyed by their local names as the compressors take them."""
        return {k[len(name) + 1:]: v for k, v in self.tensors.items() if k.rpartition(".")[0] == name}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Written]:
    """CASES[index], written on first use and shared by every test that looks at it, to keep the suite fast."""
    cache: dict[int, Written] = {}

    def get(index: int) -> Written:
        if index not in cache:
            fmt, options = CASES[index]
            cache[index] = Written(tmp_path_factory.mktemp(IDS[index]), fmt, options)
        return cache[index]

    return get


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The decoders too work on tensors small enough that torch's thread hand-off would dominate."""
    with single_threaded():
        yield


# ----- decoders written here ----- #


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Split int32 words (last dim) into their unsigned fields, lowest first, through the little-endian bytes."""
    assert sys.byteorder == "little"
    octets = words.contiguous().view(torch.uint8).to(torch.int64)
    if bits == 8:
        return octets
    assert bits == 4
    return torch.stack((octets & 0xF, octets >> 4), dim=-1).flatten(-2)


def _field_bit_by_bit(word: int, index: int, bits: int) -> int:
    """Field `index` of one int32, one bit at a time."""
    word &= 0xFFFFFFFF
    return sum(((word >> (index * bits + b)) & 1) << b for b in range(bits))


def _e4m3(raw: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn from its bit fields: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals at e = 0."""
    octets = raw.view(torch.uint8).to(torch.int64)
    sign = 1.0 - 2.0 * (octets >> 7).double()
    exponent = (octets >> 3) & 0xF
    mantissa = (octets & 0x7).double()
    assert not ((exponent == 15) & (mantissa == 7)).any(), "NaN in weights"
    normal = (1 + mantissa / 8) * torch.pow(2.0, (exponent - 7).double())
    subnormal = mantissa / 8 * 2.0 ** -6
    return (sign * torch.where(exponent == 0, subnormal, normal)).float()


def _decode_awq(case: Written) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """AWQ GEMM through nibbles of bytes, plus bit-by-bit spot checks; returns name -> (weight, element scale)."""
    group = case.qconfig["group_size"]
    rng = random.Random(0)
    decoded = {}
    for name in case.names:
        qweight, qzeros = case.tensors[f"{name}.qweight"], case.tensors[f"{name}.qzeros"]
        q = _fields(qweight, 4).unflatten(-1, (-1, 8))[..., list(AWQ_REVERSE_ORDER)].flatten(-2)  # [in, out]
        zeros = _fields(qzeros, 4).unflatten(-1, (-1, 8))[..., list(AWQ_REVERSE_ORDER)].flatten(-2)
        scales = case.tensors[f"{name}.scales"].float()  # [in / group, out]
        in_features, out_features = q.shape
        for _ in range(SPOT_CHECKS):
            k, n = rng.randrange(in_features), rng.randrange(out_features)
            word = int(qweight[k, n // 8])
            assert _field_bit_by_bit(word, AWQ_REVERSE_ORDER[n % 8], 4) == int(q[k, n])
            zword = int(qzeros[k // group, n // 8])
            assert _field_bit_by_bit(zword, AWQ_REVERSE_ORDER[n % 8], 4) == int(zeros[k // group, n])
        rows = torch.arange(in_features) // group
        decoded[name] = (((q - zeros[rows]) * scales[rows]).t(), scales[rows].t())
    return decoded


def _decode_awq_with_compressed_tensors(case: Written) -> dict[str, torch.Tensor]:
    """AWQ through compressed-tensors' AutoAWQ converter, then its pack-quantized decompressor."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    converter = AutoAWQConverter.from_autoawq_config(case.qconfig)
    tensors = converter.process(dict(case.tensors))
    config = converter.update_config(None)
    (scheme,) = config.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(config.format)
    decoded = {}
    for name in case.names:
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        local["weight_scale"] = local["weight_scale"].float()  # evaluate (q - z) * s in float32, as the twin does
        decoded[name] = compressor.decompress(local, scheme)["weight"]
    return decoded


def _decode_gptq(case: Written) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ v1 through bytes, zero = stored + 1, groups looked up through g_idx, plus bit-by-bit spot checks."""
    bits = case.qconfig["bits"]
    per = 32 // bits
    rng = random.Random(1)
    decoded = {}
    for name in case.names:
        qweight, qzeros = case.tensors[f"{name}.qweight"], case.tensors[f"{name}.qzeros"]
        g_idx = case.tensors[f"{name}.g_idx"].long()
        q = _fields(qweight.t(), bits)  # [out, in]
        zeros = _fields(qzeros, bits) + 1  # [groups, out]
        scales = case.tensors[f"{name}.scales"].float()
        out_features, in_features = q.shape
        for _ in range(SPOT_CHECKS):
            k, n = rng.randrange(in_features), rng.randrange(out_features)
            assert _field_bit_by_bit(int(qweight[k // per, n]), k % per, bits) == int(q[n, k])
            g = int(g_idx[k])
            assert _field_bit_by_bit(int(qzeros[g, n // per]), n % per, bits) + 1 == int(zeros[g, n])
        decoded[name] = ((q - zeros[g_idx].t()) * scales[g_idx].t(), scales[g_idx].t())
    return decoded


def _decode_ct(case: Written) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """compressed-tensors' own decompressor for the scheme the config names."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(case.qconfig)
    (scheme,) = config.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    decoded = {}
    for name in case.names:
        local = case.module(name)
        local["weight_scale"] = local["weight_scale"].float()
        weight = compressor.decompress(local, scheme)["weight"]
        decoded[name] = (weight, _expand_scale(local["weight_scale"], weight.shape))
        if scheme.weights.type == "float":
            assert torch.equal(_e4m3(local["weight"]) * decoded[name][1], weight)
    return decoded


def _decode_fp8(case: Written) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """AutoFP8: e4m3 from its bit fields times the scalar float32 scale."""
    decoded = {}
    for name in case.names:
        weight, scale = case.tensors[f"{name}.weight"], case.tensors[f"{name}.weight_scale"]
        assert scale.shape == () and scale.dtype == torch.float32
        value = _e4m3(weight) * scale
        decoded[name] = (value, scale.expand(value.shape))
    return decoded


def _decode_fp8_with_compressed_tensors(case: Written) -> dict[str, torch.Tensor]:
    """AutoFP8 weights through compressed-tensors' per-tensor float dequantization."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True)
    return {name: dequantize(case.tensors[f"{name}.weight"], case.tensors[f"{name}.weight_scale"].reshape(1),
                             args=args) for name in case.names}


def _expand_scale(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A tensor / channel / group scale repeated out to every weight element it covers, for the error bound."""
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(shape)
    return scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)


DECODERS: dict[str, Callable[[Written], dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {
    "awq": _decode_awq, "gptq": _decode_gptq, "ct-w4a16": _decode_ct, "ct-w8a16": _decode_ct, "ct-fp8": _decode_ct,
    "ct-int8": _decode_ct, "fp8": _decode_fp8,
}


def _bound(case: Written, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |float - dequantized| round-to-nearest allows, per element.

    Integers: half a step, plus what rounding the stored scale can push past the clamped top of the range
    (about 2**bits steps of the scale's unit roundoff). fp8 e4m3: half a unit in the last of 3 mantissa bits,
    2**-4 relative, or half the subnormal spacing 2**-10 in units of the scale.
    """
    if case.fmt in ("ct-fp8", "fp8"):
        return weight.abs() * (2.0 ** -4 + 1e-5) + scale * 2.0 ** -10 + 1e-7
    bits = {"awq": 4, "ct-w4a16": 4, "ct-int8": 8, "ct-w8a16": 8}.get(case.fmt) or case.qconfig["bits"]
    stored = {"awq": torch.float16, "gptq": torch.float16}.get(case.fmt) or case.options.get(
        "scale_dtype", torch.float32)
    roundoff = torch.finfo(stored).eps / 2
    return scale * (0.5 + 2 ** bits * roundoff + 1e-5) + 1e-7


# ----- tests ----- #


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_twin_equals_independent_decoding(written: Callable[[int], Written], index: int) -> None:
    case = written(index)
    decoded = case.decoded
    assert sorted(decoded) == sorted(case.names)
    for name, (weight, _) in decoded.items():
        assert torch.equal(case.twin[f"{name}.weight"], weight), name


LIBRARY_CROSS_CHECKS = {"awq": _decode_awq_with_compressed_tensors, "fp8": _decode_fp8_with_compressed_tensors}
CROSS_CHECKED = [i for i, (fmt, _) in enumerate(CASES) if fmt in LIBRARY_CROSS_CHECKS]


@pytest.mark.parametrize("index", CROSS_CHECKED, ids=[IDS[i] for i in CROSS_CHECKED])
def test_hand_written_formats_decode_alike_in_compressed_tensors(written: Callable[[int], Written],
                                                                  index: int) -> None:
    """compressed-tensors' own reader of AutoAWQ checkpoints (and its fp8 dequantization) agree with the twin."""
    case = written(index)
    for name, weight in LIBRARY_CROSS_CHECKS[case.fmt](case).items():
        assert torch.equal(case.twin[f"{name}.weight"], weight), name


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_quantization_error_within_format_bound(written: Callable[[int], Written], index: int) -> None:
    case = written(index)
    for name, (weight, scale) in case.decoded.items():
        original = case.original[f"{name}.weight"]
        assert (weight != original).float().mean() > 0.5, f"{name}: quantization left the weights alone"
        excess = (weight - original).abs() - _bound(case, original, scale)
        assert excess.max() <= 0, f"{name}: error exceeds the bound by {excess.max():.3g}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_only_decoder_linears_are_quantized(written: Callable[[int], Written], index: int) -> None:
    """Embeddings, norms and lm_head stay float32 and untouched, in both folders; the twin is plain float32."""
    case = written(index)
    assert sorted(case.twin) == sorted(case.original)
    assert all(t.dtype == torch.float32 for t in case.twin.values())
    quantized_weights = {f"{name}.weight" for name in case.names}
    for key, value in case.original.items():
        if key not in quantized_weights:
            assert torch.equal(case.tensors[key], value), key
            assert torch.equal(case.twin[key], value), key
    dense_config = json.loads((case.dense / "config.json").read_text())
    assert {k: v for k, v in case.config.items() if k != "quantization_config"} == dense_config
    assert dense_config["architectures"] == ["LlamaForCausalLM"]
    for folder in (case.quantized, case.dense):
        assert (folder / "tokenizer.json").exists()


def _expected_layout(case: Written, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Local tensor name -> (shape, dtype) for one linear, from each format's published layout."""
    o = case.options
    if case.fmt == "awq":
        groups = in_features // o["group_size"]
        return {"qweight": ((in_features, out_features // 8), torch.int32),
                "qzeros": ((groups, out_features // 8), torch.int32),
                "scales": ((groups, out_features), torch.float16)}
    if case.fmt == "gptq":
        per = 32 // o["bits"]
        groups = 1 if o["group_size"] == -1 else in_features // o["group_size"]
        return {"qweight": ((in_features // per, out_features), torch.int32),
                "qzeros": ((groups, out_features // per), torch.int32),
                "scales": ((groups, out_features), torch.float16), "g_idx": ((in_features,), torch.int32)}
    if case.fmt == "fp8":
        layout = {"weight": ((out_features, in_features), torch.float8_e4m3fn), "weight_scale": ((), torch.float32)}
        if o.get("activation_scheme") == "static":
            layout["input_scale"] = ((), torch.float32)
        return layout
    scale_dtype = o.get("scale_dtype", torch.float32)
    if case.fmt in ("ct-w4a16", "ct-w8a16"):
        bits = 4 if case.fmt == "ct-w4a16" else 8
        group = o.get("group_size", 128)
        groups = 1 if group == -1 else in_features // group
        layout = {"weight_packed": ((out_features, in_features * bits // 32), torch.int32),
                  "weight_scale": ((out_features, groups), scale_dtype), "weight_shape": ((2,), torch.int64)}
        if not o.get("symmetric", True):
            layout["weight_zero_point"] = ((out_features * bits // 32, groups), torch.int32)
        return layout
    if case.fmt == "ct-int8":
        return {"weight": ((out_features, in_features), torch.int8),
                "weight_scale": ((out_features, 1), scale_dtype)}
    layout = {"weight": ((out_features, in_features), torch.float8_e4m3fn),
              "weight_scale": ((out_features, 1) if o.get("strategy", "channel") == "channel" else (1,),
                               scale_dtype)}
    if o.get("activation_scheme") == "static":
        layout["input_scale"] = ((1,), scale_dtype)
    return layout


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_tensor_layout(written: Callable[[int], Written], index: int) -> None:
    case = written(index)
    for name in case.names:
        out_features, in_features = case.original[f"{name}.weight"].shape
        local = case.module(name)
        assert {k: (tuple(v.shape), v.dtype) for k, v in local.items()} == _expected_layout(
            case, out_features, in_features), name
        if "weight_shape" in local:
            assert local["weight_shape"].tolist() == [out_features, in_features]


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_quantization_config(written: Callable[[int], Written], index: int) -> None:
    case = written(index)
    o, config = case.options, case.qconfig
    if case.fmt == "awq":
        assert config == {"quant_method": "awq", "zero_point": True, "group_size": o["group_size"], "bits": 4,
                          "version": "gemm", "modules_to_not_convert": None}
    elif case.fmt == "gptq":
        expected = {"bits": o["bits"], "group_size": o["group_size"], "damp_percent": 0.01,
                    "desc_act": o.get("desc_act", False), "static_groups": False, "sym": o["sym"],
                    "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
                    "quant_method": "gptq", "checkpoint_format": "gptq"}
        assert config == expected
        assert json.loads((case.quantized / "quantize_config.json").read_text()) == expected
        assert case.metadata["format"] == "pt" and case.metadata["gptq_bits"] == str(o["bits"])
    elif case.fmt == "fp8":
        expected = {"quant_method": "fp8", "activation_scheme": o.get("activation_scheme", "dynamic"),
                    "ignored_layers": ["lm_head"]}
        if o.get("kv_scales"):
            expected["kv_cache_scheme"] = "static"
        assert config == expected
    else:
        pytest.importorskip("compressed_tensors")
        from compressed_tensors.quantization import QuantizationConfig

        parsed = QuantizationConfig.model_validate(config)
        assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
        assert parsed.ignore == ["lm_head"]
        (scheme,) = parsed.config_groups.values()
        assert scheme.targets == ["Linear"]
        weights, inputs = scheme.weights, scheme.input_activations
        expected_format = {"ct-w4a16": "pack-quantized", "ct-w8a16": "pack-quantized", "ct-fp8": "float-quantized",
                           "ct-int8": "int-quantized"}[case.fmt]
        assert parsed.format == scheme.format == expected_format
        if case.fmt in ("ct-w4a16", "ct-w8a16"):
            group = o.get("group_size", 128)
            assert (weights.num_bits, weights.type, weights.symmetric) == (
                4 if case.fmt == "ct-w4a16" else 8, "int", o.get("symmetric", True))
            assert (weights.strategy, weights.group_size) == (("channel", None) if group == -1 else ("group", group))
            assert weights.actorder == o.get("actorder") and inputs is None
        elif case.fmt == "ct-int8":
            assert (weights.num_bits, weights.type, weights.strategy) == (8, "int", "channel")
            assert (inputs.num_bits, inputs.type, inputs.strategy, inputs.dynamic) == (8, "int", "token", True)
        else:
            assert (weights.num_bits, weights.type, weights.strategy) == (8, "float", o.get("strategy", "channel"))
            static = o.get("activation_scheme") == "static"
            assert (inputs.type, inputs.strategy, inputs.dynamic) == (
                "float", "tensor" if static else "token", not static)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_kv_scales(written: Callable[[int], Written], index: int) -> None:
    case = written(index)
    stored = {k: v for k, v in case.tensors.items() if k.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
    if not case.options.get("kv_scales"):
        assert not stored
        return
    layers = len(case.names) // len(LINEARS)
    assert len(stored) == 2 * layers
    shape = (1,) if case.fmt.startswith("ct-") else ()
    for layer in range(layers):
        for kind, value in zip("kv", kv_scale_values(layer)):
            tensor = stored[f"model.layers.{layer}.self_attn.{kind}_scale"]
            assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shape
            assert float(tensor) == value
    if case.fmt.startswith("ct-"):
        assert case.qconfig["kv_cache_scheme"] == {"dynamic": False, "group_size": None, "num_bits": 8,
                                                   "strategy": "tensor", "symmetric": True, "type": "float"}


@pytest.mark.parametrize("index", [i for i, (fmt, o) in enumerate(CASES) if fmt == "gptq" and o.get("desc_act")],
                         ids=[IDS[i] for i, (fmt, o) in enumerate(CASES) if fmt == "gptq" and o.get("desc_act")])
def test_gptq_act_order_is_shared_by_matrices_reading_one_input(written: Callable[[int], Written],
                                                                index: int) -> None:
    case = written(index)
    group = case.options["group_size"]
    for layer in range(len(case.names) // len(LINEARS)):
        g_idx = {sub: case.tensors[f"model.layers.{layer}.{sub}.g_idx"] for sub in INPUT_OF}
        by_input: dict[str, torch.Tensor] = {}
        for sub, key in INPUT_OF.items():
            assert torch.equal(by_input.setdefault(key, g_idx[sub]), g_idx[sub]), sub
        for sub, idx in g_idx.items():
            counts = torch.bincount(idx.long())
            if group == -1:
                assert not idx.any()
                continue
            assert (counts == group).all(), sub  # every group takes group_size columns of the order
            assert (idx.diff() < 0).any(), f"{sub}: act order left the columns in place"
        if group != -1:
            assert not torch.equal(by_input["attn"], by_input["attn_out"])


TRANSFORMERS_CT = [i for i, (fmt, o) in enumerate(CASES) if fmt.startswith("ct-") and "scale_dtype" not in o]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # asking to dequantize is the point
@pytest.mark.parametrize("index", TRANSFORMERS_CT, ids=[IDS[i] for i in TRANSFORMERS_CT])
def test_transformers_dequantizes_ct_checkpoints_to_the_twin(written: Callable[[int], Written], index: int) -> None:
    """transformers' own compressed-tensors loader, asked to dequantize, lands on the twin's weights.

    Cases with half-precision scales are left out: there the library multiplies in the scale's dtype, and the twin
    is defined in float32.
    """
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    case = written(index)
    model = AutoModelForCausalLM.from_pretrained(case.quantized, quantization_config=CompressedTensorsConfig(
        dequantize=True))
    state = model.state_dict()
    for key, value in case.twin.items():
        assert torch.equal(state[key], value), key


def test_twin_loads_in_transformers(written: Callable[[int], Written]) -> None:
    from transformers import AutoModelForCausalLM

    case = written(0)
    model = AutoModelForCausalLM.from_pretrained(case.dense, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, case.twin[key]), key


def test_unknown_format_or_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_quantized(tmp_path / "a", "gguf", 0)
    with pytest.raises(TypeError):
        write_quantized(tmp_path / "b", "awq", 0, bits=3)
    assert set(FORMATS) == {fmt for fmt, _ in CASES}
