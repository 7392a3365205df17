"""Module paths that moved when the front door was split into subsystems, kept importable as aliases.

``import geoswc.sweep`` gives the very module object `geoswc.evaluation.sweep` (so attributes set on one are seen
through the other), and the old ``python -m`` / ``accelerate launch -m`` spellings of commands still run them:
``-m geoswc.fit`` is ``-m geoswc fit`` and ``-m geoswc.tag`` is ``-m geoswc tag``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module path -> its home now
MOVED = {
    "geoswc.tag": "geoswc.tagging",
    "geoswc.tag_output": "geoswc.tagging.output",
    "geoswc.similar": "geoswc.tagging.similar",
    "geoswc.archive": "geoswc.tagging.exif_copies",
    "geoswc.evaluate": "geoswc.evaluation.run",
    "geoswc.sweep": "geoswc.evaluation.sweep",
    "geoswc.engine": "geoswc.train.engine",
    "geoswc.fit": "geoswc.train.fit",
    "geoswc.visloc": "geoswc.importers.visloc",
    "geoswc.serve.cells": "geoswc.geocells.polygons",
    "geoswc.vpr.model": "geoswc.street.model",
    "geoswc.vpr.embed": "geoswc.street.embed",
}
# old module path run with ``-m`` -> the command it ran
COMMANDS = {"geoswc.fit": "fit", "geoswc.tag": "tag"}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The target ran when it was imported; the import system has just stamped the alias's spec on it.
        module.__spec__ = self._own_spec

    def get_code(self, fullname: str):
        # runpy asks for code only when the old path is run as a program (``python -m geoswc.fit``).
        if fullname not in COMMANDS:
            raise ImportError(f"{fullname} is an alias of {self.target}; run `python -m geoswc` instead")
        source = (
            "import runpy, sys\n"
            f"sys.argv[1:1] = [{COMMANDS[fullname]!r}]\n"
            "runpy.run_module('geoswc', run_name='__main__', alter_sys=True)\n"
        )
        return compile(source, f"<{fullname}: geoswc {COMMANDS[fullname]}>", "exec")


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(MOVED[fullname]))


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
