"""The `geoswc` command line: one console script, one subcommand per job.

Every subcommand lives next to the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code. `main`
takes an argument list so tests can call ``main([...])`` directly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from geoswc import __version__

# Modules that contribute subcommands, in the order `geoswc --help` lists them.
COMMAND_MODULES = (
    "geoswc.geocells.cli",  # cells build | assign
    "geoswc.data.cli",  # data synth | shards | check-leaks
    "geoswc.train",  # train
    "geoswc.retrieval.cli",  # index build
    "geoswc.eval.cli",  # score
    "geoswc.evaluate",  # evaluate
    "geoswc.tag",  # tag
    "geoswc.fit",  # fit | demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoswc",
        description="Global-scale image geolocation: geocells, classification heads, retrieval and "
        "Search within Cell.",
    )
    parser.add_argument("--version", action="version", version=f"geoswc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def close_process_group() -> None:
    """Tear down the ranks' process group at the end of a command (a no-op without one). A rank that exits with
    the group open can abort at interpreter shutdown ('terminate called without an active exception') while the
    backend's threads still run. Commands create the group through accelerate; nothing is imported here."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad user input: one clear line, no traceback.
        print(f"geoswc {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
