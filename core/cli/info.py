"""`paged info`: every registered backend, whether it can run here and why, and which one would."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="check this backend as `--device` would")


def run(args: argparse.Namespace) -> int:
    from paged.backends.registry import choose, discover

    registered = discover()
    print(f"{'backend':<10} {'available':<10} {'source':<12} reason")
    for reg in registered:
        facts = reg.facts()
        print(f"{facts.name:<10} {'yes' if facts.available else 'no':<10} {facts.source:<12} {facts.reason}")
    chosen = choose(registered, args.device)
    print(f"\nchosen: {chosen.name}")
    return 0
