"""The same splits through Ray (`--distributed-executor-backend ray`) on a local Ray cluster the tests start:
greedy tokens of TP=2, PP=2 and TP=2 x PP=2 equal one rank's exactly in float32; an actor killed mid-run ends
the engine with an error naming it and no actor stays behind; a cluster that does not answer, or has too
few devices, is a one-line error."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from paged import LLM, SamplingParams
from paged.errors import UserError
from tests.models_factory import save_tiny_model, split_workload


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("arch, tp, pp", [("qwen2", 2, 1), ("qwen2", 1, 2), ("qwen2", 2, 2), ("mistral", 2, 2)],
                         ids=["qwen2-tp2", "qwen2-pp2", "qwen2-tp2xpp2", "mistral-tp2xpp2"])
def test_ray_splits_give_one_rank_tokens(arch, tp, pp, tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    kwargs, prompts, params = split_workload(arch, tmp_path, num_prompts=8)
    one = [o.outputs[0].token_ids for o in LLM(**kwargs).generate(prompts, params, use_tqdm=False)]
    split = LLM(**kwargs, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray")
    pids = list(split.engine.core.runner.ranks.pids)
    assert len(pids) == tp * pp - 1 and os.getpid() not in pids
    try:
        assert [o.outputs[0].token_ids for o in split.generate(prompts, params, use_tqdm=False)] == one
    finally:
        split.engine.core.shutdown()
    assert _gone(pids)


def test_a_ray_actor_that_dies_fails_the_engine_and_leaves_no_actor(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    save_tiny_model("llama", tmp_path, seed=random.randrange(1 << 30))
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", kv_cache_memory="32MiB", max_model_len=128,
              tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray")
    engine, pids = llm.engine, list(llm.engine.core.runner.ranks.pids)
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": [5, 6, 7 + i]},
                           SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    os.kill(pids[2], signal.SIGKILL)  # rank 3: the last stage
    with pytest.raises(RuntimeError, match=rf"worker .*3 \(Ray actor pid {pids[2]}\).* died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert _gone(pids)


def test_a_ray_cluster_that_does_not_answer_or_is_too_small_is_one_line(tmp_path, ray_cluster, monkeypatch):
    save_tiny_model("llama", tmp_path, num_hidden_layers=8)
    kwargs = dict(model=str(tmp_path), device="cpu", kv_cache_memory="32MiB", max_model_len=128,
                  distributed_executor_backend="ray")
    with socket_port() as port:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(UserError, match=f"the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} does not answer"):
            LLM(**kwargs, tensor_parallel_size=2)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    with pytest.raises(UserError, match="16 ranks need 16 CPU; the Ray cluster has 8"):
        LLM(**kwargs, tensor_parallel_size=2, pipeline_parallel_size=8)


class socket_port:
    """A port nothing listens on, held bound (not listening) while in use so nothing else takes it."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()
