"""`paged serve [MODEL]`: the OpenAI-compatible HTTP server, with `vllm serve`'s flag names and defaults."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from paged.cli.engine_args import add_engine_args, engine_kwargs
from paged.config import parse_bytes
from paged.errors import UserError

if TYPE_CHECKING:  # imported for real only when serving: `paged --help` must stay quick
    from paged.engine import LLMEngine

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGED_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="HF folder or .gguf file, as --model (default: SmolLM2-135M-Instruct)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces, as vLLM)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV})")
    server.add_argument("--metrics-require-key", action="store_true", help="ask for the API key on /metrics too")
    server.add_argument("--served-model-name", nargs="+",
                        help="names clients use as `model` (default: the model argument)")
    server.add_argument("--generation-config", default="auto",
                        help="sampling defaults: 'auto' (the model's generation_config), 'vllm' (none), or a folder")
    server.add_argument("--max-body-size", default="16MiB", help="larger request bodies are refused with 413")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on SIGTERM/SIGINT before they are aborted")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from paged.default_model import DEFAULT_MODEL_NAME
    from paged.engine import LLMEngine
    from paged.server.app import build_app
    from paged.server.async_engine import AsyncEngine
    from paged.server.settings import ServerSettings

    if args.model_tag and args.model and args.model_tag != args.model:
        raise UserError(f"two models named: {args.model_tag} and --model {args.model}", param="model")
    model = args.model_tag or args.model
    max_body_bytes = _body_size(args.max_body_size)  # checked before the minutes a model may take to load
    engine = LLMEngine.from_kwargs(**{**engine_kwargs(args), "model": model,
                                      "generation_config": args.generation_config})
    settings = ServerSettings(
        served_model_names=args.served_model_name or [model or DEFAULT_MODEL_NAME],
        model_path=engine.source.path,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        metrics_require_key=args.metrics_require_key,
        max_body_bytes=max_body_bytes,
        generation_defaults=engine.sampling_defaults,
    )
    _log_capacity(engine)
    app = build_app(AsyncEngine(engine), settings)
    del engine  # the AsyncEngine owns it now, and frees it on shutdown
    logger.info("serving %s on http://%s:%d%s", ", ".join(settings.served_model_names), args.host, args.port,
                " (API key required)" if settings.api_key else "")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    uvicorn.Server(config).run()
    return 0


def _body_size(value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise UserError(f"--max-body-size: {error}", param="max_body_size") from None


def _log_capacity(engine: LLMEngine) -> None:
    """What an operator sizes a deployment by: the concurrency the KV cache allows.

    Which backend runs, and why, the backend registry has logged already, and the engine the KV cache.
    """
    config = engine.config
    tokens = engine.num_blocks * config.block_size
    logger.info(
        "maximum concurrency: %d sequences (--max-num-seqs); %.2fx requests of the full %d-token context fit the "
        "KV cache at once", config.max_num_seqs, tokens / engine.max_model_len, engine.max_model_len,
    )
