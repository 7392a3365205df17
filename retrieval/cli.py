"""Placeholder command registration; the owning module replaces this file."""


def _unavailable(args):
    raise NotImplementedError(f'geoswc {args.command} is not built yet')


def register(subparsers):
    subparsers.add_parser('index', help='(in development)').set_defaults(func=_unavailable)
