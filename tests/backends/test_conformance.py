"""What every backend must do, checked on each one available here (see conftest.py).

Attention and the KV write against float64, in every dtype the backend declares and with an fp8 cache
where it declares one; its communicator across two ranks; greedy generation on a tiny model equal to the
CPU backend's, with prefix caching hitting, eagerly and, where it declares graphs, through them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import torch

from paged import LLM, SamplingParams
from paged.backends.interface import Backend
from tests.backends.attention_cases import build_case, check, run_attention, tolerance
from tests.backends.workers import collectives
from tests.models_factory import VOCAB, save_tiny_model

feature = pytest.mark.feature

# (context lengths, query lengths): a step of each kind the runner makes.
CASES = {
    "prefill": ([5, 23, 1, 16], [5, 23, 1, 16]),
    "cached-prefix": ([30, 9, 17], [4, 9, 1]),
    "decode": ([1, 40, 4, 8, 9, 33], [1] * 6),
    "mixed": ([17, 5, 33, 8], [17, 1, 4, 1]),
}


@feature("attention")
@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_attention_and_kv_write(backend: Backend, backend_name: str, kind: str, heads: int, kv_heads: int):
    case = build_case(*CASES[kind], heads, kv_heads)
    check(case, *run_attention(case, backend), tolerance(torch.float32))


@feature("attention")
@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("window,softcap", [(7, None), (1, None), (12, 3.0), (None, 2.0)])
def test_sliding_window_and_softcap(backend: Backend, backend_name: str, kind: str, window, softcap):
    """A window shorter than most contexts (one token: each query sees itself only), with and without
    Gemma 2's soft cap, on every kind of step."""
    case = build_case(*CASES[kind], 8, 2)
    case.window, case.softcap = window, softcap
    check(case, *run_attention(case, backend), tolerance(torch.float32))


@feature("dtypes")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_attention_dtype(backend: Backend, backend_name: str, dtype: torch.dtype):
    if dtype not in backend.supported_dtypes:
        pytest.skip(f"{backend_name} does not declare {dtype}")
    case = build_case(*CASES["mixed"], 8, 2, head_dim=32, dtype=dtype)
    check(case, *run_attention(case, backend), tolerance(dtype))


@feature("fp8")
def test_fp8_kv_cache(backend: Backend, backend_name: str):
    fp8 = backend.fp8_dtype()
    if fp8 is None:
        pytest.skip(f"{backend_name} declares no fp8 type")
    case = build_case(*CASES["mixed"], 8, 2, head_dim=32, dtype=torch.bfloat16)
    # The reference attends over the fp8-rounded K/V that the cache can hold.
    case.full_kv = [(k.to(fp8).to(k.dtype), v.to(fp8).to(v.dtype)) for k, v in case.full_kv]
    case.key, case.value = case.key.to(fp8).to(case.key.dtype), case.value.to(fp8).to(case.value.dtype)
    check(case, *run_attention(case, backend, cache_dtype=fp8), tolerance(torch.bfloat16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@feature("tensor parallel")
def test_communicator_two_ranks(backend: Backend, backend_name: str):
    if backend.dist_backend == "xla":  # JAX: ranks are mesh positions in one process
        _mesh_collectives(backend)
        return
    if backend.dist_backend != "gloo" and backend.device_count() < 2:
        pytest.skip(f"{backend.dist_backend} needs a device per rank; {backend_name} has {backend.device_count()}")
    torch.multiprocessing.spawn(collectives, args=(2, _free_port(), backend_name), nprocs=2)


def _mesh_collectives(backend: Backend) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec
    from torchax.interop import jax_view, torch_view

    if len(jax.devices()) < 2:
        pytest.skip("JAX sees one device (it started before conftest could ask for two host devices)")
    comm = backend.communicator(0, 2)

    def per_rank(x):
        t = torch_view(x)
        return jax_view((comm.all_reduce(t), comm.all_gather(t, dim=-1), comm.broadcast(t, src=1)))

    rows = PartitionSpec(comm.axis)
    run = jax.shard_map(per_rank, mesh=comm.mesh, in_specs=rows, out_specs=(rows, rows, rows))
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)  # rank r holds row r
    reduced, gathered, sent = run(x)
    assert (reduced == x.sum(0)).all()
    assert (gathered == x.reshape(1, 6)).all()
    assert (sent == x[1]).all()
    comm.barrier()


# --- end to end on a tiny model -------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed = random.randrange(1 << 30)
    print(f"tiny model seed {seed}")
    folder = tmp_path_factory.mktemp("conformance-qwen2")
    save_tiny_model("qwen2", folder, seed=seed)
    return folder


def _prompts() -> tuple[list[dict], list[dict]]:
    """A first request, then three sharing its first 20 tokens (one full block: a prefix-cache hit) and one not."""
    rng = random.Random(0)
    words = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]  # noqa: E731
    prefix = words(20)
    first = [prefix + words(5)]
    rest = [prefix + words(n) for n in (1, 9, 30)] + [words(12)]
    return [{"prompt_token_ids": p} for p in first], [{"prompt_token_ids": p} for p in rest]


def _generate(device: str, model: Path, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(model), dtype="float32", device=device, kv_cache_memory="16MiB", max_num_seqs=4,
              max_model_len=128, block_size=16, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = [o for batch in _prompts() for o in llm.generate(batch, params, use_tqdm=False)]
    return [o.outputs[0].token_ids for o in outputs], llm


@pytest.fixture(scope="session")
def cpu_tokens(tiny_model: Path) -> list[list[int]]:
    return _generate("cpu", tiny_model, enforce_eager=True, enable_prefix_caching=False)[0]


@feature("greedy", "prefix caching")
def test_greedy_with_prefix_caching_matches_cpu(backend: Backend, backend_name: str, tiny_model, cpu_tokens):
    tokens, llm = _generate(backend_name, tiny_model, enforce_eager=True, enable_prefix_caching=True)
    assert llm.engine.stats.prefix_cache_hits > 0
    assert tokens == cpu_tokens


@feature("graphs")
def test_decode_graphs_match_cpu(backend: Backend, backend_name: str, tiny_model, cpu_tokens, monkeypatch):
    if not backend.supports_graphs:
        pytest.skip(f"{backend_name} declares no graphs")
    from paged.model_runner import ModelRunner

    replayed = []
    upload = ModelRunner._upload_graph_inputs  # every graph replay, synchronous or run ahead, goes through it

    def counted(runner: ModelRunner, sched, size: int, query_len: int):
        replayed.append(size)
        return upload(runner, sched, size, query_len)

    monkeypatch.setattr(ModelRunner, "_upload_graph_inputs", counted)
    tokens, llm = _generate(backend_name, tiny_model, enable_prefix_caching=False)
    assert sorted(llm.engine.runner.graphs) == [(1, 1), (2, 1), (4, 1)]
    assert replayed
    assert tokens == cpu_tokens
