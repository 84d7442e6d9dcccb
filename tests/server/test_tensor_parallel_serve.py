"""`paged serve --tensor-parallel-size 2` on the CPU: the engine core starts its worker, answers with the tokens
one rank gives offline, and leaves no process behind when stopped."""

from __future__ import annotations

import random

import openai
import psutil

from paged import LLM, SamplingParams
from tests.models_factory import VOCAB, save_tiny_model
from tests.server.conftest import start_server, stop_server


def test_served_over_two_ranks_like_one_offline(tmp_path):
    save_tiny_model("qwen2", tmp_path / "model", seed=random.randrange(1 << 30))
    prompts = [[random.randrange(3, VOCAB) for _ in range(random.randint(3, 30))] for _ in range(4)]
    offline = LLM(model=str(tmp_path / "model"), dtype="float32", device="cpu", kv_cache_memory="32MiB",
                  max_model_len=128).generate([{"prompt_token_ids": p} for p in prompts],
                                              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                              use_tqdm=False)
    server = start_server(str(tmp_path / "model"), tmp_path / "serve.log", "--tensor-parallel-size", "2",
                          "--max-model-len", "128", "--kv-cache-memory", "32MiB")
    try:
        layout = server.log_text().split("tensor parallel over ")[1].splitlines()[0]
        assert layout.startswith("2 ranks (gloo)"), layout
        workers = [psutil.Process(int(pid)) for pid in layout.split("worker pids [")[1].rstrip("]").split(",")]
        family = psutil.Process(server.process.pid).children(recursive=True)
        assert {w.pid for w in workers} <= {p.pid for p in family}
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
