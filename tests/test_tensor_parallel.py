"""Tensor and pipeline parallel over real worker processes on the CPU (gloo): greedy tokens of TP=2, PP=2 and
TP=2 x PP=2 equal one rank's exactly in float32, for a Llama, a Mistral with a single KV head (replicated on
both ranks of a stage) and a Qwen2 (qkv bias, tied embeddings on stage 0, a vocabulary two ranks do not split
evenly), with three layers that two stages do not split evenly, through chunked prefill and preemption (a
preempted request is sent to the workers whole again); a worker killed mid-run ends the engine with an error
naming it, and no process stays behind."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from paged import LLM, SamplingParams
from paged.errors import UserError
from tests.models_factory import VOCAB, save_tiny_model, split_workload


SPLITS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
# Every split of the dense families; the experts' own split (their intermediate slices) once per MoE family.
SPLIT_CASES = [(arch, split) for arch in ("llama", "mistral", "qwen2") for split in SPLITS] + [
    ("qwen3", "tp2"), ("phi3", "tp2"), ("mixtral", "tp2"), ("qwen3-moe", "tp2xpp2"), ("qwen2-moe", "tp2"),
    ("gemma2", "tp2"), ("gemma3", "tp2xpp2"), ("apertus", "tp2")]


@pytest.mark.parametrize("arch, split", SPLIT_CASES, ids=[f"{arch}-{split}" for arch, split in SPLIT_CASES])
def test_split_models_give_one_rank_tokens(arch, split, tmp_path):
    tp, pp = SPLITS[split]
    kwargs, prompts, params = split_workload(arch, tmp_path)
    one = [o.outputs[0].token_ids for o in LLM(**kwargs).generate(prompts, params, use_tqdm=False)]
    two_ranks = LLM(**kwargs, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    core = two_ranks.engine.core
    depths, submit = [], core.runner.submit
    core.runner.submit = lambda sched: (depths.append(len(core._micro_batches)), submit(sched))[1]
    try:
        two = [o.outputs[0].token_ids for o in two_ranks.generate(prompts, params, use_tqdm=False)]
        assert core.scheduler.num_preemptions > 0
        assert max(depths, default=0) == (1 if pp > 1 else 0)  # with stages, two micro-batches were in flight
    finally:
        two_ranks.engine.core.shutdown()
    assert two == one


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_a_worker_that_dies_fails_the_engine_and_leaves_no_process(tp, pp, tmp_path):
    save_tiny_model("llama", tmp_path, seed=random.randrange(1 << 30))
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", kv_cache_memory="32MiB", max_model_len=128,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    engine, executor = llm.engine, llm.engine.core.runner
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": [5, 6, 7 + i]},
                           SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    os.kill(executor.ranks.processes[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"worker 1 \(exit code -9\) died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert not any(p.is_alive() for p in executor.ranks.processes)
    assert not torch.distributed.is_initialized()  # another engine may start in this process


def test_a_split_the_heads_do_not_allow_is_a_one_line_error(tmp_path):
    save_tiny_model("llama", tmp_path)  # 4 heads, 2 KV heads
    with pytest.raises(UserError, match="tensor_parallel_size 3: 4 attention heads and 2 KV heads do not split over 3 ranks"):
        LLM(model=str(tmp_path), device="cpu", kv_cache_memory="32MiB", max_model_len=128, tensor_parallel_size=3)
    with pytest.raises(UserError, match="pipeline_parallel_size 4: the model has only 3 layers"):
        LLM(model=str(tmp_path), device="cpu", kv_cache_memory="32MiB", max_model_len=128, pipeline_parallel_size=4)


def test_paged_info_shows_the_layout(tmp_path, capsys):
    from paged.cli.main import main

    save_tiny_model("llama", tmp_path, num_hidden_layers=5)
    assert main(["info", "--device", "cpu", "--model", str(tmp_path), "-tp", "2", "-pp", "2"]) == 0
    out = capsys.readouterr().out
    assert ("layout: tensor parallel 2 x pipeline parallel 2 = 4 ranks (stage 0: layers 0-1 on ranks 0-1, "
            "stage 1: layers 2-4 on ranks 2-3)") in out
    assert "per rank: 2 attention heads, 1 KV heads; ranks 1..3 run in: mp" in out
    assert main(["info", "--device", "cpu", "--model", str(tmp_path), "-tp", "3"]) == 2
    assert "tensor_parallel_size 3: 4 attention heads and 2 KV heads do not split over 3 ranks" in capsys.readouterr().err


def test_a_rank_reads_only_its_slices_of_the_split_matrices(tmp_path, monkeypatch):
    """Rank 1 of 2, built in this process: its parameters are its slices of the checkpoint's, and of the
    safetensors file it read in full only the norms (every split matrix was read as a slice)."""
    from paged.backends.interface import TorchDistributedCommunicator
    from paged.backends.registry import load_backend
    from paged.model_loading import build_model
    from paged.model_source import resolve_model
    from paged.models.loader import CheckpointTensor

    reference = save_tiny_model("qwen2", tmp_path, seed=random.randrange(1 << 30), vocab_size=VOCAB + 1).state_dict()
    read_whole = []
    load = CheckpointTensor.load
    monkeypatch.setattr(CheckpointTensor, "load", lambda self: read_whole.append(self._name) or load(self))
    backend = load_backend("cpu")
    source = resolve_model(str(tmp_path))
    model = build_model(source, backend, backend.precision(torch.float32, None), 128,
                        comm=TorchDistributedCommunicator(1, 2))
    assert read_whole and all(name.endswith("norm.weight") for name in read_whole), read_whole
    params = dict(model.named_parameters())
    q, k = reference["model.layers.1.self_attn.q_proj.weight"], reference["model.layers.1.self_attn.k_proj.weight"]
    qkv = params["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv[: q.shape[0] // 2], q[q.shape[0] // 2 :])
    assert torch.equal(qkv[q.shape[0] // 2 : q.shape[0] // 2 + k.shape[0] // 2], k[k.shape[0] // 2 :])
    down = reference["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(params["model.layers.2.mlp.down_proj.weight"], down[:, down.shape[1] // 2 :])
    embed = reference["model.embed_tokens.weight"]  # 513 rows: rank 1 holds 256 of its 257
    assert torch.equal(params["model.embed_tokens.weight"][:256], embed[257:])


class _RankOneOfTwo:
    """Rank 1 of 2 with the collectives left out: a layer's own share of a product, checked alone."""

    rank, world_size = 1, 2

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_a_rank_keeps_its_share_of_gguf_blocks_quantized(qtype):
    """Rank 1 of 2 keeps its rows (q, k, v, one KV head per rank; the LM head's vocabulary range, padded where
    the vocabulary does not split evenly) and its block-aligned columns of GGUF matrices as blocks, and computes
    its share of the product from them; a layer whose parts differ in type holds the
    dequantized share instead."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from paged.backends.registry import load_backend
    from paged.models.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear
    from paged.models.ops import bind_ops
    from paged.quant.gguf import GGUFBlocks

    backend = load_backend("cpu")
    ops = bind_ops(backend.ops(backend.precision(None, qtype)))  # the precision `auto` picks for such a GGUF
    if qtype not in ops["decoder_linear"].block_types:
        pytest.skip(f"the CPU backend computes from {qtype} blocks only at AVX2 and above")
    torch.manual_seed(random.randrange(1 << 30))

    def blocks(rows: int, cols: int, kind: str = qtype) -> GGUFBlocks:
        data = quantize(torch.randn(rows, cols).numpy(), GGMLQuantizationType[kind])
        return GGUFBlocks(kind, torch.from_numpy(np.ascontiguousarray(data)), (rows, cols))

    comm = _RankOneOfTwo()
    x = torch.randn(3, 128)
    qkv = ColumnParallelLinear(128, [128, 64, 64], False, comm, ops)
    parts = [blocks(128, 128), blocks(64, 128), blocks(64, 128)]
    for shard, part in enumerate(parts):
        assert qkv.takes_blocks(part)
        qkv.load_blocks(part, shard)
    qkv.process_weights()
    assert qkv.method.storage(qkv) != "bfloat16"
    dense = torch.cat([p.dequantize(torch.float32)[p.shape[0] // 2 :] for p in parts])
    torch.testing.assert_close(qkv(x), x @ dense.T, rtol=2e-2, atol=2e-2)

    down = RowParallelLinear(256, 128, False, comm, ops)
    matrix = blocks(128, 256)
    assert down.takes_blocks(matrix)
    down.load_blocks(matrix, None)
    down.process_weights()
    torch.testing.assert_close(down(x), x @ matrix.dequantize(torch.float32)[:, 128:].T, rtol=2e-2, atol=2e-2)

    head = ParallelLMHead(99, 128, comm, ops)  # rank 1 holds 49 of 99 rows, padded to 50
    vocab = blocks(99, 128)
    assert head.takes_blocks(vocab)
    head.load_blocks(vocab, None)
    head.process_weights()
    logits = head.method.apply(head, x, None)
    assert logits.shape == (3, 50) and not logits[:, 49].any()
    torch.testing.assert_close(logits[:, :49], x @ vocab.dequantize(torch.float32)[50:].T, rtol=2e-2, atol=2e-2)

    mixed = ColumnParallelLinear(128, [128, 64, 64], False, comm, ops)
    parts = [blocks(128, 128, "Q8_0" if qtype != "Q8_0" else "Q4_0"), blocks(64, 128), blocks(64, 128)]
    for shard, part in enumerate(parts):
        mixed.load_blocks(part, shard)
    mixed.process_weights()
    dense = torch.cat([p.dequantize(torch.float32)[p.shape[0] // 2 :] for p in parts])
    torch.testing.assert_close(mixed(x), x @ dense.bfloat16().float().T, rtol=1e-3, atol=1e-3)  # packed as bf16


def test_a_row_split_off_gguf_block_boundaries_is_refused():
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from paged.quant.gguf import GGUFBlocks

    data = quantize(torch.randn(4, 64).numpy(), GGMLQuantizationType.Q8_0)
    matrix = GGUFBlocks("Q8_0", torch.from_numpy(np.ascontiguousarray(data)), (4, 64))
    assert matrix.splits_at(32) and not matrix.splits_at(16 + 8)
    with pytest.raises(ValueError, match="do not fall on Q8_0 blocks of 32"):
        matrix.columns(8, 32)
    torch.testing.assert_close(matrix.columns(32, 32).dequantize(torch.float32),
                               matrix.dequantize(torch.float32)[:, 32:])


@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
def test_a_split_gguf_model_gives_one_rank_tokens(smollm2_gguf, tp, pp):
    """SmolLM2 (9 heads, 3 KV heads, Q4_1 blocks, a tied Q8_0 embedding) split over ranks that keep their
    shares of its blocks quantized: the greedy tokens of one rank."""
    kwargs = dict(model=smollm2_gguf, device="cpu", kv_cache_memory="64MiB", max_model_len=256)
    prompts = [{"prompt_token_ids": random.sample(range(49152), 5 + 4 * i)} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    single = LLM(**kwargs)
    one = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    split = LLM(**kwargs, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        # Rank 0 stores its share as one rank stores the whole: as blocks where this CPU level computes from them.
        def kinds(storage: str) -> set[str]:  # "Q4_1 x120, Q8_0 x1" -> {"Q4_1", "Q8_0"}
            return {part.split(" x")[0] for part in storage.split(", ")}

        assert kinds(split.engine.core.runner.runner.model.weight_storage) == kinds(
            single.engine.core.runner.model.weight_storage)
        two = [o.outputs[0].token_ids for o in split.generate(prompts, params, use_tqdm=False)]
    finally:
        split.engine.core.shutdown()
    assert two == one


def test_a_rank_reads_only_its_shares_of_a_gguf_file(smollm2_gguf, monkeypatch):
    """Rank 1 of 3, built in this process from SmolLM2's GGUF: no matrix is read whole (heads' rows of the
    permuted Q and K, block-aligned columns of o and down, a vocabulary range of the tied embedding), and its
    q/k/v and logits are its shares of one rank's."""
    from paged.backends.interface import TorchDistributedCommunicator
    from paged.backends.registry import load_backend
    from paged.model_loading import build_model
    from paged.model_source import resolve_model
    from paged.models.loader import GGUFTensor

    backend, source = load_backend("cpu"), resolve_model(smollm2_gguf)
    precision = backend.precision(None, "Q4_1")
    whole_model = build_model(source, backend, precision, 128)
    read_whole = []
    blocks = GGUFTensor.blocks
    monkeypatch.setattr(GGUFTensor, "blocks", lambda self: read_whole.append(self._tensor.name) or blocks(self))
    rank = build_model(source, backend, precision, 128, comm=TorchDistributedCommunicator(1, 3))
    assert read_whole == []
    assert rank.lm_head.method.storage(rank.lm_head) == whole_model.lm_head.method.storage(whole_model.lm_head)

    x = torch.randn(3, 576)
    q, k, v = whole_model.model.layers[0].self_attn.qkv_proj(x).split([576, 192, 192], dim=-1)
    ours = rank.model.layers[0].self_attn.qkv_proj(x)
    torch.testing.assert_close(ours, torch.cat((q[:, 192:384], k[:, 64:128], v[:, 64:128]), dim=-1))
    logits = rank.lm_head.method.apply(rank.lm_head, x, None)
    torch.testing.assert_close(logits, whole_model.lm_head.method.apply(whole_model.lm_head, x, None)[:, 16384:32768])
