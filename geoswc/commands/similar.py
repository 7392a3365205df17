"""`geoswc similar QUERY... --model DIR --archive TAGRUN -o OUT.csv`: the photos of a tagged archive most
similar to each query photo, from the embeddings the tag run kept (`geoswc.tagging.similar.find_similar`)."""

from __future__ import annotations

import argparse

from geoswc.commands.tag import refusals_exit_1
from geoswc.data.validation import choice_error
from geoswc.tagging.similar import find_similar, write_similar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "queries", nargs="+", metavar="QUERY", help="query photos: files, folders, globs or @list.txt files"
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="the model folder the archive was tagged with"
    )
    parser.add_argument(
        "--archive",
        required=True,
        metavar="TAGRUN",
        help="a geoswc tag output (its embeddings OUT.embeddings.npy lie beside it)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT.csv", help="result CSV")
    parser.add_argument("--top", type=int, default=10, help="archive photos listed per query (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="query photos per model call (default 32)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="write text cells as they are (by default a cell starting with =, +, - or @ gets a leading ')",
    )


def run(args: argparse.Namespace) -> int:
    """Run `geoswc similar` from parsed arguments; prints where the results went."""
    if not args.output.lower().endswith(".csv"):
        raise choice_error("output format", args.output, (".csv",))
    with refusals_exit_1():
        results = find_similar(
            args.queries, model=args.model, archive=args.archive, top=args.top, batch_size=args.batch_size
        )
        write_similar(args.output, results, raw=args.raw)
    queries = len({row["query"] for row in results})
    errors = sum(1 for row in results if row["error"])
    print(
        f"{queries} queries, {len(results) - errors} matches in {args.output}"
        + (f" ({errors} unreadable queries)" if errors else "")
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "similar",
        help="the photos of a tagged archive most similar to query photos (no second pass over the archive)",
        description="List the photos of a tagged archive most similar to each query photo, best first, from "
        "the embeddings geoswc tag kept beside its output (no second pass over the archive).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
