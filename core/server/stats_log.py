"""The periodic stats line an operator tails, as vLLM logs it: throughput, queue, KV cache, prefix cache;
and, while drafts are checked, a speculative-decoding line.

Rates are the core's own counters differenced over the interval, so they count every API server's
requests; one API server (the first) logs them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from paged.core_protocol import EngineStats

logger = logging.getLogger("paged.stats")

LOG_STATS_INTERVAL_S = 10.0


class StatsLogger:
    def __init__(self, read_stats: Callable[[], EngineStats], interval: float = LOG_STATS_INTERVAL_S) -> None:
        self._read = read_stats
        self._interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        before, since = self._read(), time.monotonic()
        while True:
            await asyncio.sleep(self._interval)
            now, stats = time.monotonic(), self._read()
            for line in (stats_line(before, stats, now - since), spec_decode_line(before, stats, now - since)):
                if line is not None:
                    logger.info(line)
            before, since = stats, now


def stats_line(before: EngineStats, after: EngineStats, seconds: float) -> str | None:
    """The line for one interval; None when the engine was idle throughout (nothing to say)."""
    prompt = after.prompt_tokens - before.prompt_tokens
    generated = after.generation_tokens - before.generation_tokens
    if not (prompt or generated or after.num_running or after.num_waiting):
        return None
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return (f"Avg prompt throughput: {prompt / seconds:.1f} tokens/s, "
            f"Avg generation throughput: {generated / seconds:.1f} tokens/s, "
            f"Running: {after.num_running} reqs, Waiting: {after.num_waiting} reqs, "
            f"KV cache usage: {after.kv_cache_usage * 100:.1f}%, "
            f"Prefix cache hit rate: {hits / queries * 100 if queries else 0.0:.1f}%")


def spec_decode_line(before: EngineStats, after: EngineStats, seconds: float) -> str | None:
    """vLLM's "SpecDecoding metrics" line for one interval; None when no draft was checked in it."""
    drafts = after.spec_num_drafts - before.spec_num_drafts
    if not drafts:
        return None
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    earlier = before.spec_accepted_per_position
    rates = ", ".join(f"{(count - (earlier[i] if i < len(earlier) else 0)) / drafts:.3f}"
                      for i, count in enumerate(after.spec_accepted_per_position))
    return (f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / drafts:.2f}, "
            f"Accepted throughput: {accepted / seconds:.2f} tokens/s, Drafted throughput: {drafted / seconds:.2f} "
            f"tokens/s, Accepted: {accepted} tokens, Drafted: {drafted} tokens, Per-position acceptance rate: "
            f"{rates}, Avg Draft acceptance rate: {accepted / drafted * 100 if drafted else 0.0:.1f}%")
