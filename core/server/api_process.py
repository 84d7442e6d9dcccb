"""An API server process of `paged serve`: HTTP, tokenization, detokenization and SSE, never the device.

Every API server accepts on the same listening socket (bound once by the supervisor; the kernel spreads
connections), loads only the tokenizer and the model's config, and talks to the engine core through
its own EngineClient.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, replace
from types import FrameType

import uvicorn

from paged.config import EngineConfig
from paged.model_source import source_of
from paged.processing import InputProcessor
from paged.server.processes import CoreAddresses, become_child
from paged.server.reasoning import ReasoningParser
from paged.server.settings import ServerSettings


@dataclass(frozen=True)
class APIServerOptions:
    uvicorn_log_level: str = "info"
    shutdown_timeout: float = 30.0  # seconds in-flight requests get on SIGTERM before they are aborted
    log_stats: bool = True  # the periodic stats line (API server 0 only)
    log_requests: bool = False
    max_log_len: int | None = None  # prompt tokens a request's log line shows; None: all
    log_level: str = "INFO"
    max_waiting_requests: int | None = None  # beyond this many waiting in the core, 429 with Retry-After
    ssl_keyfile: str | None = None  # with ssl_certfile: HTTPS
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None  # the CAs a client certificate is checked against
    root_path: str = ""  # the path prefix a proxy serves this under (ASGI root_path)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the shutdown an orchestrator wants: on SIGTERM (or SIGINT) keep accepting, answer
    new requests 503, let running ones finish for up to the drain timeout, end the rest with an error event,
    then stop and exit 0 (uvicorn alone stops accepting at once and exits by the signal). A second signal
    stops at once."""

    def __init__(self, config: uvicorn.Config, client, drain_timeout: float) -> None:
        super().__init__(config)
        self._client = client
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        await self._client.drain(self._drain_timeout)
        await asyncio.sleep(0.2)  # the handlers of the requests just ended write their last events
        self.should_exit = True


def run_api_server(index: int, config: EngineConfig, settings: ServerSettings, addresses: CoreAddresses,
                   core_pid: int, listener: socket.socket, options: APIServerOptions, parent_pid: int) -> None:
    become_child(f"APIServer{index}", options.log_level, parent_pid)
    from paged.server.app import build_app
    from paged.server.engine_client import EngineClient

    inputs = InputProcessor(config, source_of(config))
    if settings.reasoning_parser:
        ReasoningParser.load(settings.reasoning_parser, inputs.tokenizer)  # the tokenizer has its tokens
    client = EngineClient(inputs, addresses, index, core_pid, log_requests=options.log_requests,
                          max_log_len=options.max_log_len,
                          max_waiting_requests=options.max_waiting_requests)
    settings = replace(settings, generation_defaults=inputs.sampling_defaults)
    app = build_app(client, settings, log_stats=options.log_stats and index == 0)
    # log_config=None: uvicorn's lines go through this process's logging, prefixed with its role. Its own
    # graceful shutdown comes after the drain, when every request has ended: a second is plenty.
    uvicorn_config = uvicorn.Config(app, log_level=options.uvicorn_log_level, log_config=None,
                                    timeout_graceful_shutdown=1, ssl_keyfile=options.ssl_keyfile,
                                    ssl_certfile=options.ssl_certfile, ssl_ca_certs=options.ssl_ca_certs,
                                    root_path=options.root_path)
    DrainingServer(uvicorn_config, client, options.shutdown_timeout).run(sockets=[listener])
