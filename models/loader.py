"""Checkpoint readers: every weight of a model as (Hugging Face name, tensor), one tensor at a time.

Streaming keeps peak memory at one tensor beyond the model itself, and using Hugging Face names for
both formats lets model code describe its weights once.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from gguf import GGUFReader, ReaderTensor
from safetensors import safe_open

from paged.errors import UserError
from paged.quant.gguf import GGUFBlocks, column_bytes, dequantize_tensor, splits_at, stored_rows, torch_shape

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"

# GGUF architectures we read, and whether llama.cpp's converter permuted their Q and K rows
# (Mistral and other Llama-likes are written as "llama").
_GGUF_PERMUTES_QK = {"llama": True, "qwen2": False, "qwen3": False, "phi3": False, "gemma2": False, "gemma3": False,
                     "qwen2moe": False, "qwen3moe": False}

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router, and Qwen2-MoE's shared expert
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GEMMA_LAYER_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}
# Where an architecture's GGUF parts name other modules: Phi-3 keeps its fused projections; Gemma has norms
# around both blocks.
_GGUF_ARCH_LAYER_NAMES = {"phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                          "gemma2": _GEMMA_LAYER_NAMES, "gemma3": _GEMMA_LAYER_NAMES}
# Every expert's matrix of one projection, stacked [experts, out, in]: handed out one expert at a time, under
# the per-expert names of a Hugging Face checkpoint.
_GGUF_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GGUF_EXPERTS_TENSOR = re.compile(r"blk\.(?P<layer>\d+)\.(?P<part>ffn_(?:gate|up|down)_exps)\.weight")
# llama.cpp's converter stores Gemma's norm weights plus one (its kernels scale by the weight alone).
_GGUF_NORMS_PLUS_ONE = {"gemma2", "gemma3"}

_GGUF_LAYER_TENSOR = re.compile(r"blk\.(?P<layer>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)")

# llama.cpp stores Llama 3's rope scaling as per-frequency factors; Hugging Face models rebuild them from
# config.rope_scaling, so the tensor has no counterpart and is skipped, as transformers does.
_GGUF_IGNORED = {"rope_freqs.weight"}


class LazyTensor(ABC):
    """A checkpoint tensor not read yet, so that a tensor-parallel rank reads only the slice it keeps (narrow,
    indexing) instead of the whole matrix; load() reads all of it. Valid until the loader moves on."""

    shape: torch.Size

    @abstractmethod
    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    @abstractmethod
    def __getitem__(self, index) -> torch.Tensor: ...

    @abstractmethod
    def load(self) -> torch.Tensor: ...


class CheckpointTensor(LazyTensor):
    """A safetensors tensor, read through the file's slicing."""

    def __init__(self, shard, name: str) -> None:
        self._shard, self._name = shard, name
        self._slice = shard.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._slice[(slice(None),) * dim + (slice(start, start + length),)]

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._shard.get_tensor(self._name)


class GGUFTensor(LazyTensor):
    """A GGUF matrix, in Hugging Face layout, read from the memory-mapped file only where it is sliced: rows, or
    columns on whole blocks, come dequantized (narrow, indexing) or as blocks (rows, columns), so a rank's share
    is all that leaves the disk. Other slices read it whole (load, blocks).

    Q and K of a Llama-like file are stored permuted within each head (see _unpermute_rows); a slice of whole
    heads is unpermuted on its own."""

    def __init__(self, tensor: ReaderTensor, dtype: torch.dtype, permuted_heads: int | None = None) -> None:
        self._tensor, self._dtype, self._heads = tensor, dtype, permuted_heads
        self.qtype = tensor.tensor_type.name
        self.shape = torch.Size(torch_shape(tensor))

    def rows(self, start: int, length: int) -> GGUFBlocks:
        """Rows start .. start + length as their blocks (a copy)."""
        if self._heads is not None and (start % self._head_rows or length % self._head_rows):
            return self.blocks().rows(start, length)
        raw = torch.from_numpy(stored_rows(self._tensor)[start : start + length].copy())
        if self._heads is not None and length:
            raw = _unpermute_rows(raw, length // self._head_rows)
        return GGUFBlocks(self.qtype, raw, (length, self.shape[1]))

    def columns(self, start: int, length: int) -> GGUFBlocks:
        """Columns start .. start + length (on block boundaries) as their blocks."""
        if self._heads is not None:  # Q and K are cut by rows only; their columns are read with the whole
            return self.blocks().columns(start, length)
        raw = torch.from_numpy(stored_rows(self._tensor)[:, column_bytes(self.qtype, start, length)].copy())
        return GGUFBlocks(self.qtype, raw, (self.shape[0], length))

    def splits_at(self, column: int) -> bool:
        return splits_at(self.qtype, column)

    def blocks(self) -> GGUFBlocks:
        """The whole matrix as its blocks."""
        raw = torch.from_numpy(stored_rows(self._tensor).copy())
        if self._heads is not None:
            raw = _unpermute_rows(raw, self._heads)
        return GGUFBlocks(self.qtype, raw, self.shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.blocks().dequantize(dtype)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            return self.rows(start, length).dequantize(self._dtype)
        if self.splits_at(start) and self.splits_at(length):
            return self.columns(start, length).dequantize(self._dtype)
        return self.load().narrow(dim, start, length)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(self.shape[0])
            return self.narrow(0, start, max(0, stop - start))
        return self.load()[index]

    def load(self) -> torch.Tensor:
        return self.dequantize(self._dtype)

    @property
    def _head_rows(self) -> int:
        return self.shape[0] // self._heads


def whole(tensor):
    """A checkpoint tensor read in full (one that came lazily), or what was given."""
    return tensor.load() if isinstance(tensor, LazyTensor) else tensor


def iter_safetensors(folder: str | Path, wanted: Callable[[str], bool] = lambda name: True, lazy: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | CheckpointTensor]]:
    """The tensors of a Hugging Face folder: sharded (through its index), `model.safetensors`, or any *.safetensors;
    only those `wanted` are read, and with `lazy` only as far as the taker reads them (CheckpointTensor)."""
    folder = Path(folder)
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt") as shard:
            for name in shard.keys():
                if wanted(name):
                    yield name, CheckpointTensor(shard, name) if lazy else shard.get_tensor(name)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files to read, each once.

    The index, when present, is authoritative: a folder may also hold other checkpoints (Mistral ships a
    `consolidated.safetensors` next to the Hugging Face shards) whose tensors must not be read twice.
    """
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / _SINGLE_FILE).is_file():
        return [folder / _SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in '{folder}'")
    return files


def iter_gguf(path: str | Path, dtype: torch.dtype, keep_blocks: frozenset[str] = frozenset(),
              wanted: Callable[[str], bool] = lambda name: True, lazy: bool = False
              ) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks | GGUFTensor]]:
    """The tensors of a GGUF file, dequantized to `dtype`, under Hugging Face names and in Hugging Face layout;
    matrices of a type in keep_blocks come as their GGUFBlocks instead (rows in the same layout), and with
    `lazy` every matrix comes unread (GGUFTensor), for a rank that reads only its slices.

    `lm_head.weight` only appears when the file has its own output matrix; otherwise the embeddings are tied.
    """
    reader = gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_PERMUTES_QK:
        raise UserError(
            f"GGUF architecture '{arch}' of '{path}' is not supported; supported: {', '.join(_GGUF_PERMUTES_QK)}"
        )
    permuted_heads = _permuted_heads(reader, arch, path) if _GGUF_PERMUTES_QK[arch] else {}
    for tensor in reader.tensors:
        if tensor.name in _GGUF_IGNORED:
            continue
        experts = _GGUF_EXPERTS_TENSOR.fullmatch(tensor.name)
        if experts:
            prefix = f"model.layers.{experts['layer']}.mlp.experts"
            if wanted(prefix):
                stacked = dequantize_tensor(tensor, dtype)
                projection = _GGUF_STACKED_EXPERTS[experts["part"]]
                yield from ((f"{prefix}.{e}.{projection}.weight", matrix) for e, matrix in enumerate(stacked))
            continue
        name, part = _hf_name(tensor.name, arch)
        if not wanted(name):
            continue
        if len(tensor.shape) != 2:  # a norm or a bias
            weight = dequantize_tensor(tensor, dtype)
            if arch in _GGUF_NORMS_PLUS_ONE and name.endswith("norm.weight"):
                weight = weight - 1
            yield name, _unpermute_rows(weight, permuted_heads[part]) if part in permuted_heads else weight
            continue
        unread = GGUFTensor(tensor, dtype, permuted_heads.get(part))
        if lazy:
            yield name, unread
        elif unread.qtype in keep_blocks:
            yield name, unread.blocks()
        else:
            yield name, unread.load()


def gguf_reader(path: str | Path) -> GGUFReader:
    """The file's reader, parsed once per file version: parsing reads the whole metadata (seconds for a
    large vocabulary), and both the precision choice and the weight loading need it."""
    stat = Path(path).stat()
    return _reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)


def gguf_gemma_facts(path: str | Path) -> dict[str, Any]:
    """Config fields of a Gemma GGUF that llama.cpp stores (or implies) and transformers' GGUF reader leaves
    at its defaults: the soft caps, the query scale (Gemma 2 27B's is hidden / heads, as llama.cpp knows it
    by its 46 layers; the others' is the head size) and Gemma 3's rope scaling factor of its global layers."""
    reader = gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_NORMS_PLUS_ONE:
        return {}
    facts: dict[str, Any] = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (value := _field(reader, f"{arch}.{key}")) is not None:
            facts[key] = float(value)
    hidden, heads = _field(reader, f"{arch}.embedding_length"), _field(reader, f"{arch}.attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if arch == "gemma2" and _field(reader, "gemma2.block_count") == 46 and hidden and heads:
        facts["query_pre_attn_scalar"] = hidden // heads
    elif head_dim:
        facts["query_pre_attn_scalar"] = head_dim
    if arch == "gemma3" and (factor := _field(reader, "gemma3.rope.scaling.factor")):
        facts["global_rope_factor"] = float(factor)
    return facts


def gguf_matrix_type(path: str | Path) -> str:
    """The GGUF type that most of the file's matrix weights (by count) are stored in, e.g. "Q4_1"."""
    counts: Counter[str] = Counter()
    for tensor in gguf_reader(path).tensors:
        if len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] += int(tensor.n_elements)
    return counts.most_common(1)[0][0] if counts else "F32"


def _hf_name(gguf_name: str, arch: str) -> tuple[str, str | None]:
    """(Hugging Face name, GGUF layer part such as "attn_q" or None) of a GGUF tensor.

    An unknown tensor is an error rather than silently dropped, so a half-loaded model cannot run.
    """
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name], None
    match = _GGUF_LAYER_TENSOR.fullmatch(gguf_name)
    names = {**_GGUF_LAYER_NAMES, **_GGUF_ARCH_LAYER_NAMES.get(arch, {})}
    if match is None or match["part"] not in names:
        raise UserError(f"GGUF tensor '{gguf_name}' has no Hugging Face counterpart in the supported architectures")
    return f"model.layers.{match['layer']}.{names[match['part']]}.{match['kind']}", match["part"]


def _permuted_heads(reader: GGUFReader, arch: str, path: str | Path) -> dict[str, int]:
    """GGUF layer part -> the head count its rows were permuted with: all heads for Q, kv heads for K."""
    heads = _field(reader, f"{arch}.attention.head_count")
    if heads is None:
        raise UserError(f"GGUF file '{path}' has no '{arch}.attention.head_count' metadata")
    # llama.cpp may leave out the kv head count when it equals the head count.
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv")
    return {"attn_q": heads, "attn_k": heads if kv_heads is None else kv_heads}


def _unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, which regroups each head's rotary pairs.

    Hugging Face Llama rotates the two halves of a head together (x[i] with x[i + d/2]); llama.cpp's kernel
    rotates neighbours (x[2i] with x[2i + 1]), so its converter interleaves the halves of every head. Here the
    interleaved rows [head, pair, 2] are read back as [head, 2, pair]. Works for a weight or a bias alike.
    """
    half = weight.shape[0] // heads // 2
    rows = weight.reshape(heads, half, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def _field(reader: GGUFReader, key: str) -> object:
    """A scalar or string metadata value, or None when the file does not have it."""
    field = reader.get_field(key)
    return None if field is None else field.contents()
