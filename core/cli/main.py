"""`paged` command line: subcommands live in their own modules and are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from paged import __version__
from paged.errors import UserError

SUBCOMMANDS = {
    "generate": ("paged.cli.generate", "generate text for one prompt"),
    "info": ("paged.cli.info", "list the backends and which one would run"),
    "serve": ("paged.cli.serve", "serve a model over an OpenAI-compatible HTTP API"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="paged", description="LLM inference and serving")
    parser.add_argument("--version", action="version", version=f"paged {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    return parser, modules


_HTTP_CLIENT_LOGGERS = ("httpx", "httpx2", "httpcore")


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for client in _HTTP_CLIENT_LOGGERS:  # a Hub download would log every request at INFO
        logging.getLogger(client).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return modules[args.command].run(args) or 0
    except UserError as e:
        print(f"paged: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
