"""The front door's shape: the command line on top, old module paths as aliases of the same modules.

- ``python -m geoswc COMMAND`` (what ``accelerate launch -m geoswc fit|tag|train`` runs) and the older
  ``-m geoswc.fit`` / ``-m geoswc.tag`` / ``-m geoswc.train`` spellings run the same commands;
- every moved module path imports the very module object of its new home;
- no module outside `geoswc.cli` and `geoswc.commands` imports `geoswc.cli`, neither by an import statement nor
  by name through importlib or runpy (import-linter sees only the former).
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import geoswc
from geoswc import _moved

PACKAGE = Path(geoswc.__file__).resolve().parent
ROOT = PACKAGE.parent


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_an_old_module_path_is_the_same_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    # The module keeps its own identity (its spec is not the alias's).
    assert importlib.import_module(old).__spec__.name == new


def test_documented_names_import_from_their_old_paths():
    from geoswc.tag import ReviewOptions, prediction_row, tag_rows  # noqa: F401
    from geoswc.sweep import EvalStore, Replayer  # noqa: F401
    from geoswc.engine import train_loop  # noqa: F401
    from geoswc.similar import duplicate_groups, find_similar  # noqa: F401
    from geoswc.tag_output import OutputError  # noqa: F401
    from geoswc.archive import write_gps_exif  # noqa: F401
    from geoswc.assemble import assemble_model  # noqa: F401

    assert geoswc.tag_photos is importlib.import_module("geoswc.tagging.run").tag_photos
    assert geoswc.fit_model is importlib.import_module("geoswc.train.fit").fit_model


@pytest.mark.parametrize(
    "module_args, usage",
    [
        (["geoswc", "fit"], "usage: geoswc fit"),
        (["geoswc.fit"], "usage: geoswc fit"),
        (["geoswc.tag"], "usage: geoswc tag"),
        (["geoswc.train", "heads"], "usage: geoswc train heads"),
    ],
)
def test_python_dash_m_spellings_run_the_command(module_args, usage):
    result = subprocess.run(
        [sys.executable, "-m", *module_args, "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)


def _production_modules():
    roots = [PACKAGE] + [
        ROOT / name for name in ("data", "geocells", "classifiers", "retrieval", "swc", "eval")
    ]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            yield path


def _names_cli(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "geoswc.cli" or (
                node.module == "geoswc" and any(a.name == "cli" for a in node.names)
            ):
                return True
        if isinstance(node, ast.Import) and any(a.name == "geoswc.cli" for a in node.names):
            return True
        if isinstance(node, ast.Constant) and node.value == "geoswc.cli":
            return True
    return False


def test_only_the_command_line_imports_the_command_line():
    offenders = []
    for path in _production_modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("geoswc/cli.py", "geoswc/__main__.py") or rel.startswith("geoswc/commands/"):
            continue
        if _names_cli(ast.parse(path.read_text(), filename=str(path))):
            offenders.append(rel)
    assert offenders == []


def test_the_checker_sees_an_import_of_the_command_line():
    assert _names_cli(ast.parse("from geoswc.cli import main"))
    assert _names_cli(ast.parse("import importlib\nimportlib.import_module('geoswc.cli')"))
    assert not _names_cli(ast.parse("from geoswc.config import Config"))
