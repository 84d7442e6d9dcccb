"""`paged serve` over TP=2, PP=2 and TP=2 x PP=2 on the CPU, in worker processes and as Ray actors on a local Ray
cluster: the engine core starts its workers, answers with the tokens one rank gives offline, and leaves no
worker behind when stopped."""

from __future__ import annotations

import random
import re

import openai
import psutil
import pytest

from paged import LLM, SamplingParams
from tests.models_factory import VOCAB, save_tiny_model
from tests.server.conftest import start_server, stop_server


@pytest.mark.parametrize("executor, tp, pp", [("mp", 2, 1), ("mp", 1, 2), ("mp", 2, 2), ("ray", 2, 2)],
                         ids=["tp2", "pp2", "tp2xpp2", "ray-tp2xpp2"])
def test_served_split_like_one_rank_offline(executor, tp, pp, tmp_path, request):
    env = {"RAY_ADDRESS": request.getfixturevalue("ray_cluster")} if executor == "ray" else {}
    save_tiny_model("qwen2", tmp_path / "model", seed=random.randrange(1 << 30))
    prompts = [[random.randrange(3, VOCAB) for _ in range(random.randint(3, 30))] for _ in range(4)]
    offline = LLM(model=str(tmp_path / "model"), dtype="float32", device="cpu", kv_cache_memory="32MiB",
                  max_model_len=128).generate([{"prompt_token_ids": p} for p in prompts],
                                              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                              use_tqdm=False)
    server = start_server(str(tmp_path / "model"), tmp_path / "serve.log", "-tp", str(tp), "-pp", str(pp),
                          "--distributed-executor-backend", executor, "--max-model-len", "128",
                          "--kv-cache-memory", "32MiB", env=env)
    try:
        layout = server.log_text().split(f"tensor parallel {tp} x pipeline parallel {pp} = ")[1].splitlines()[0]
        assert layout.startswith(f"{tp * pp} ranks (stage 0: "), layout
        assert " over gloo: " in layout, layout
        workers = [psutil.Process(int(pid)) for pid in re.search(r"pids \[([\d, ]+)\]", layout)[1].split(",")]
        assert len(workers) == tp * pp - 1
        family = psutil.Process(server.process.pid).children(recursive=True)
        if executor == "mp":
            assert {w.pid for w in workers} <= {p.pid for p in family}
        family += workers
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        for prompt, expected in zip(prompts, offline):
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert reply.choices[0].text == expected.outputs[0].text
    finally:
        stop_server(server)
    psutil.wait_procs(family, timeout=15)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
