"""GGUF blocks -> QuantizedMatrix must dequantize bit-identically to gguf-py, the reference the dense GGUF
path and transformers both use; anything less and the integer-weight path would load a different model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from paged.quant.gguf import GGUFBlocks
from paged.quant.gguf_blocks import CONVERTIBLE, to_quantized_matrix

# Byte offsets of each type's fp16 fields inside a block: random bytes there could be inf or NaN, which no
# real file holds, so the tests overwrite them with finite values.
HALF_FIELDS = {
    "Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
# The types gguf-py has a quantizer for; the others are tested on random blocks only.
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
ROWS, SUPER_BLOCKS = 6, 3


def _columns(qtype: str) -> int:
    """Several blocks per row; for the K-quants several 256-element super-blocks."""
    block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return block_size * (SUPER_BLOCKS if block_size == 256 else 12)


def _random_blocks(qtype: str, seed: int) -> GGUFBlocks:
    """Uniform random bytes (so every code value and sub-scale occurs) with finite fp16 fields spanning
    fp16's range from subnormals to large values, either sign."""
    generator = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    cols = _columns(qtype)
    raw = generator.integers(0, 256, size=(ROWS, cols // block_size, type_size), dtype=np.uint8)
    for start in HALF_FIELDS[qtype]:
        magnitude = 10.0 ** generator.uniform(-7, 2, size=raw.shape[:2])
        halves = (generator.choice([-1.0, 1.0], size=raw.shape[:2]) * magnitude).astype(np.float16)
        raw[..., start:start + 2] = halves[..., None].view(np.uint8)
    return GGUFBlocks(qtype, torch.from_numpy(raw.reshape(ROWS, -1)), (ROWS, cols))


def _quantized_blocks(qtype: str, seed: int) -> GGUFBlocks:
    """Weights as gguf-py's own quantizer writes them, rows of very different magnitudes."""
    generator = np.random.default_rng(seed)
    cols = _columns(qtype)
    weights = generator.standard_normal((ROWS, cols)).astype(np.float32)
    weights *= 10.0 ** generator.uniform(-4, 1, size=(ROWS, 1)).astype(np.float32)
    data = quantize(weights, GGMLQuantizationType[qtype])
    return GGUFBlocks(qtype, torch.from_numpy(np.ascontiguousarray(data)), (ROWS, cols))


def _reference(blocks: GGUFBlocks) -> torch.Tensor:
    values = dequantize(blocks.data.numpy(), GGMLQuantizationType[blocks.qtype])
    return torch.from_numpy(np.array(values)).reshape(blocks.data.shape[0], blocks.shape[1])


def _assert_exact(blocks: GGUFBlocks) -> None:
    matrix = to_quantized_matrix(blocks)
    assert matrix.codes.dtype == torch.uint8 and matrix.shape == (blocks.data.shape[0], blocks.shape[1])
    assert int(matrix.codes.max()) < 2 ** matrix.bits
    assert matrix.scales.shape == (matrix.shape[0], matrix.shape[1] // matrix.group_size)
    dense, expected = matrix.dequantize(torch.float32), _reference(blocks)
    assert torch.equal(dense, expected), f"{blocks.qtype}: max |diff| {(dense - expected).abs().max().item()}"


def test_convertible_names_every_tested_type():
    assert CONVERTIBLE == frozenset(HALF_FIELDS)


@pytest.mark.parametrize("qtype", sorted(CONVERTIBLE))
def test_random_blocks_dequantize_bit_identically(qtype: str):
    for seed in range(3):
        _assert_exact(_random_blocks(qtype, seed))


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_gguf_quantized_weights_dequantize_bit_identically(qtype: str):
    for seed in range(3):
        _assert_exact(_quantized_blocks(qtype, seed))


@pytest.mark.parametrize("qtype", sorted(CONVERTIBLE))
def test_a_slice_of_rows_converts_to_the_same_rows(qtype: str):
    blocks = _random_blocks(qtype, seed=7)
    whole = to_quantized_matrix(blocks)
    part = to_quantized_matrix(GGUFBlocks(qtype, blocks.data[2:5], (3, blocks.shape[1])))
    assert torch.equal(part.codes, whole.codes[2:5])
    assert torch.equal(part.dequantize(torch.float32), whole.dequantize(torch.float32)[2:5])
    _assert_exact(GGUFBlocks(qtype, blocks.data[2:5], (3, blocks.shape[1])))


def test_an_unsupported_type_is_refused_by_name():
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]
    blocks = GGUFBlocks("Q2_K", torch.zeros(2, type_size, dtype=torch.uint8), (2, 256))
    with pytest.raises(ValueError, match="Q2_K"):
        to_quantized_matrix(blocks)


def test_bytes_that_do_not_match_the_shape_are_refused():
    blocks = _random_blocks("Q4_K", seed=0)
    with pytest.raises(ValueError, match="bytes per row"):
        to_quantized_matrix(GGUFBlocks("Q4_K", blocks.data, (ROWS, blocks.shape[1] * 2)))
