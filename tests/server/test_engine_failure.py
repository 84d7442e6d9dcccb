"""An engine that fails mid-generation: the stream gets an error event, /health turns 503, nothing hangs.

In-process (httpx over ASGI) so the engine's step can be made to fail on cue.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from paged.engine import LLMEngine
from paged.server.app import build_app
from paged.server.async_engine import AsyncEngine
from paged.server.settings import ServerSettings


def _failing_engine(model: Path, fail_after: int) -> LLMEngine:
    engine = LLMEngine.from_kwargs(model=str(model), device="cpu", dtype="float32", kv_cache_memory="16MiB",
                                   max_model_len=128)
    real_step, calls = engine.step, 0

    def step():
        nonlocal calls
        calls += 1
        if calls > fail_after:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = step
    return engine


def test_engine_failure_mid_stream(tiny_chat_model: Path) -> None:
    engine_client = AsyncEngine(_failing_engine(tiny_chat_model, fail_after=4))
    app = build_app(engine_client, ServerSettings(["tiny"], str(tiny_chat_model)))

    async def main() -> None:
        engine_client.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://paged", timeout=30) as http:
                assert (await http.get("/health")).status_code == 200
                body = {"prompt": "Hello", "max_tokens": 50, "stream": True, "ignore_eos": True}
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200
                events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                error = json.loads(events[-2])["error"]
                assert "device lost" in error["message"] and error["code"] >= 500
                assert any(json.loads(e).get("choices") for e in events[:-2])  # text streamed before the failure

                health = await http.get("/health")
                assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
                later = await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
                assert later.status_code == 503 and later.json()["error"]["code"] == 503
        finally:
            await engine_client.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
