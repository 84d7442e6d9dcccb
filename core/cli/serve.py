"""`paged serve [MODEL]`: the OpenAI-compatible HTTP server, with `vllm serve`'s flag names and defaults."""

from __future__ import annotations

import argparse
import json
import os
import ssl

from paged.backends.registry import require_device
from paged.cli.engine_args import add_engine_args, engine_kwargs
from paged.config import parse_bytes
from paged.errors import UserError
from paged.server.reasoning import REASONING_PARSERS
from paged.server.tool_parsers import TOOL_PARSERS

API_KEY_ENV = "PAGED_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="as --model: a Hub id, HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
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
    server.add_argument("--api-server-count", type=int,
                        help="HTTP processes in front of the one engine core (tokenizing, detokenizing, SSE); "
                             "default: the backend's choice (1 on a CPU, a process per 4 host cores up to 4 on "
                             "an accelerator)")
    server.add_argument("--max-waiting-requests", type=int,
                        help="refuse new requests with 429 (and Retry-After) while this many wait for the engine "
                             "(default: no limit)")
    server.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput / queue / cache line")
    server.add_argument("--enable-log-requests", action="store_true",
                        help="log each request's arrival (with its prompt) and end")
    server.add_argument("--max-log-len", type=int,
                        help="prompt tokens (and their text) a logged request shows (default: all)")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    server.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS),
                        help="how tool calls are found in the model's replies: the model family's format")
    server.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                        help="split a thinking model's <think> block into reasoning_content")
    for what in ("origins", "methods", "headers"):
        server.add_argument(f"--allowed-{what}", type=_json_list, default=["*"],
                            help=f'CORS: the allowed {what}, a JSON list (default ["*"])')
    server.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    server.add_argument("--enable-request-id-headers", action="store_true",
                        help="answer with X-Request-Id (the client's, or a new one) and name the request after it")
    server.add_argument("--ssl-keyfile", help="HTTPS: the private key file (with --ssl-certfile)")
    server.add_argument("--ssl-certfile", help="HTTPS: the certificate (chain) file")
    server.add_argument("--ssl-ca-certs", help="HTTPS: CA certificates to check client certificates against")
    server.add_argument("--root-path", default="", help="the path prefix a proxy serves this under")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    from paged.config import EngineConfig
    from paged.default_model import DEFAULT_MODEL_NAME
    from paged.model_source import localized
    from paged.server.api_process import APIServerOptions
    from paged.server.launcher import Listen, Supervisor
    from paged.server.settings import ServerSettings

    if args.model_tag and args.model and args.model_tag != args.model:
        raise UserError(f"two models named: {args.model_tag} and --model {args.model}", param="model")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise UserError("--enable-auto-tool-choice needs --tool-call-parser", param="tool_call_parser")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise UserError("--max-log-len must be at least 0", param="max_log_len")
    for name in ("api_server_count", "max_waiting_requests"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1", param=name)
    model = args.model_tag or args.model
    max_body_bytes = _body_size(args.max_body_size)  # checked before the minutes a model may take to load
    _check_tls(args)
    config = EngineConfig.from_kwargs(**{**engine_kwargs(args), "model": model,
                                         "generation_config": args.generation_config})
    require_device(config.device)  # before any model is fetched for it
    local = localized(config)  # a Hub model is fetched here once, before the processes that read it start
    settings = ServerSettings(
        served_model_names=args.served_model_name or [model or DEFAULT_MODEL_NAME],
        model_root=model or DEFAULT_MODEL_NAME,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        metrics_require_key=args.metrics_require_key,
        max_body_bytes=max_body_bytes,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        reasoning_parser=args.reasoning_parser,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        enable_request_id_headers=args.enable_request_id_headers,
    )
    options = APIServerOptions(uvicorn_log_level=args.uvicorn_log_level, shutdown_timeout=args.shutdown_timeout,
                               log_stats=not args.disable_log_stats, log_requests=args.enable_log_requests,
                               max_log_len=args.max_log_len,
                               log_level=args.log_level, max_waiting_requests=args.max_waiting_requests,
                               ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                               ssl_ca_certs=args.ssl_ca_certs, root_path=args.root_path)
    return Supervisor(local, settings, Listen(args.host, args.port), args.api_server_count, options).run()


def _body_size(value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise UserError(f"--max-body-size: {error}", param="max_body_size") from None


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not (isinstance(parsed, list) and all(isinstance(item, str) for item in parsed)):
        raise argparse.ArgumentTypeError(f'expected a JSON list of strings such as \'["https://example.com"]\', got {value!r}')
    return parsed


def _check_tls(args: argparse.Namespace) -> None:
    """Load the key and certificates once here, so that a wrong file is one line, not an API server's traceback."""
    if args.ssl_keyfile and not args.ssl_certfile:
        raise UserError("--ssl-keyfile needs --ssl-certfile", param="ssl_certfile")
    if not args.ssl_certfile:
        return
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        if args.ssl_ca_certs:
            context.load_verify_locations(args.ssl_ca_certs)
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"TLS: cannot load --ssl-certfile/--ssl-keyfile/--ssl-ca-certs: {error}",
                        param="ssl_certfile") from None
