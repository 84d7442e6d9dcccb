"""An API server process of `paged serve`: HTTP, tokenization, detokenization and SSE, never the device.

Every API server accepts on the same listening socket (bound once by the supervisor; the kernel spreads
connections), loads only the tokenizer and the model's config, and talks to the engine core through
its own EngineClient.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

from paged.config import EngineConfig
from paged.model_source import resolve_model
from paged.processing import InputProcessor
from paged.server.processes import CoreAddresses, become_child
from paged.server.settings import ServerSettings


@dataclass(frozen=True)
class APIServerOptions:
    uvicorn_log_level: str = "info"
    shutdown_timeout: float = 30.0  # seconds in-flight requests get on SIGTERM before they are aborted
    log_stats: bool = True  # the periodic stats line (API server 0 only)
    log_requests: bool = False
    log_level: str = "INFO"


def run_api_server(index: int, config: EngineConfig, settings: ServerSettings, addresses: CoreAddresses,
                   core_pid: int, listener: socket.socket, options: APIServerOptions, parent_pid: int) -> None:
    become_child(f"APIServer{index}", options.log_level, parent_pid)
    import uvicorn

    from paged.server.app import build_app
    from paged.server.engine_client import EngineClient

    inputs = InputProcessor(config, resolve_model(config.model, config.tokenizer))
    client = EngineClient(inputs, addresses, index, core_pid, log_requests=options.log_requests)
    settings = replace(settings, generation_defaults=inputs.sampling_defaults)
    app = build_app(client, settings, log_stats=options.log_stats and index == 0)
    # log_config=None: uvicorn's lines go through this process's logging, prefixed with its role.
    uvicorn_config = uvicorn.Config(app, log_level=options.uvicorn_log_level, log_config=None,
                                    timeout_graceful_shutdown=options.shutdown_timeout)
    uvicorn.Server(uvicorn_config).run(sockets=[listener])
