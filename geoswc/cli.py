"""The `geoswc` command line: one console script, one subcommand per job.

Each subcommand is a module of `geoswc.commands` with ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code; the handlers only turn flags
into the arguments of library functions. Only the module of the command being run is imported, so
``geoswc --help`` lists every command without loading torch. `main` takes an argument list so tests (and
``python -m`` entry points) can call ``main([...])`` directly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Dict, Optional, Sequence, Tuple

from geoswc import __version__
from geoswc.extras import EXTRAS, RUNTIME_MODULES, missing_extra, require  # noqa: F401

# command -> (module that registers it, one-line help), in the order `geoswc --help` lists them.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "cells": ("geoswc.commands.cells", "build S2 geocells and assign coordinates to them"),
    "data": ("geoswc.commands.data", "synthetic world, webdataset shards, leakage checks"),
    "train": ("geoswc.commands.train", "train one stage: backbone, features, heads or retrieval"),
    "index": ("geoswc.commands.index", "build the background index for Search within Cell"),
    "score": ("geoswc.commands.score", "accuracy at 0.1-2500 km of predicted positions against ground truth"),
    "evaluate": (
        "geoswc.commands.evaluate",
        "the paper's Table 1 for a model folder: classification, retrieval and Search within Cell",
    ),
    "sweep": (
        "geoswc.commands.sweep",
        "re-run Search within Cell from an evaluation over grids of K, eps, aggregation, scope, index",
    ),
    "tag": ("geoswc.commands.tag", "geotag photo archives (one row per photo; resumable)"),
    "serve": ("geoswc.commands.serve", "web app and HTTP API: drop a photo, see where it was taken and why"),
    "similar": (
        "geoswc.commands.similar",
        "the photos of a tagged archive most similar to query photos (no second pass over the archive)",
    ),
    "fit": ("geoswc.commands.fit", "train the whole pipeline from a CSV or shards to a model folder"),
    "assemble": (
        "geoswc.commands.assemble",
        "a model folder from existing stage outputs (a retrieval variant without retraining the backbone)",
    ),
    "import": (
        "geoswc.commands.import_",
        "turn a model released in another format into a geoswc model folder",
    ),
    "vpr": (
        "geoswc.commands.vpr",
        "street-scale place recognition: recall@N of GeM/NetVLAD models, street worlds",
    ),
    "info": (
        "geoswc.commands.info",
        "this machine's CPU and engines; with --model, each engine's speed on the model and what auto picks",
    ),
    "precision": (
        "geoswc.commands.precision",
        "measure and show whether a model may run in int8 or bf16 (its agreement record)",
    ),
    "demo": (
        "geoswc.commands.demo",
        "synthetic world -> fit (tiny preset) -> evaluate -> tag, in minutes on a CPU",
    ),
}


def _wanted(argv: Sequence[str]) -> Optional[str]:
    """The command named in ``argv`` (the first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser with every command's full options, or only ``command``'s (the others listed by name)."""
    parser = argparse.ArgumentParser(
        prog="geoswc",
        description="Global-scale image geolocation: geocells, classification heads, retrieval and "
        "Search within Cell.",
    )
    parser.add_argument("--version", action="version", version=f"geoswc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def describe_os_error(err: OSError) -> str:
    """``err`` in one line: the reason and the file(s) it concerns."""
    reason = err.strerror or str(err) or type(err).__name__
    files = [str(f) for f in (err.filename, err.filename2) if f is not None]
    return f"{reason}: {' -> '.join(files)}" if files else reason


def close_process_group() -> None:
    """Tear down the ranks' process group at the end of a command (a no-op without one). A rank that exits with
    the group open can abort at interpreter shutdown ('terminate called without an active exception') while the
    backend's threads still run."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _wanted(argv)
    try:
        parser = build_parser(command or "")
    except ImportError as err:
        hint = missing_extra(err)
        if hint is None:
            raise
        print(f"geoswc {command}: error: {hint}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        require(*RUNTIME_MODULES.get(getattr(args, "runtime", None), ()))
        return int(args.func(args) or 0)
    except ImportError as err:
        hint = missing_extra(err)
        if hint is None:
            raise
        # An optional part of geoswc that is not installed: the one command that installs it.
        print(f"geoswc {args.command}: error: {hint}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad user input: one clear line, no traceback.
        print(f"geoswc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # The system refused (permission denied, disk full, a folder where a file was expected): one line
        # naming the file, exit status 1.
        print(f"geoswc {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    finally:
        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
