"""Checks a model folder passes before any of its files is parsed (`geoswc.geolocator.Geolocator.from_pretrained`).

A model folder is shared like any download. Before its parts are read: no symbolic link may lead out of the
folder (a ``config.yaml`` linked to another file would have that file read and quoted in an error); the SHA-256
of every part is checked (`geoswc.geolocator`); ``config.yaml`` is read as plain YAML (a tag that builds Python
objects is refused in one line); and an error a parser raises without naming the file it was reading gets the
file's name in front, on one line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import yaml

from geoswc.config import Config


# What a model folder keeps but never loads: the stage outputs and logs of the run that made it, where
# ``geoswc fit --from RUN`` links the stages it shares with an earlier run instead of copying them.
NOT_LOADED = ("work",)


def refuse_outside_links(directory: Path) -> None:
    """Every symbolic link inside ``directory`` (at any depth, `NOT_LOADED` aside) resolves to a path inside it.

    Raises:
        ValueError: a link that leads out of the folder (named; where it leads is not read).
    """
    root = Path(directory).resolve()
    for current, folders, files in os.walk(directory):
        if Path(current) == Path(directory):
            folders[:] = [name for name in folders if name not in NOT_LOADED]
        for name in folders + files:
            path = Path(current) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ValueError(
                    f"{path} is a symbolic link that leads out of the model folder {directory}; a model folder "
                    "holds its own files: refused before anything is read (copy the file in instead)"
                )


def read_folder_config(path: Path) -> Config:
    """The ``config.yaml`` of a model folder (the defaults when there is none).

    Raises:
        ValueError: not plain YAML (a Python tag, a syntax error) or not a geoswc configuration, in one line
            naming the file.
    """
    if not path.is_file():
        return Config()
    try:
        with naming(path):
            return Config.load(path)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(
            f"{path}: not a plain YAML configuration: {problem}{where}; geoswc builds no Python objects from "
            "a configuration file"
        ) from None


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Errors of parsing ``path`` as one line that names it (``mmap length is greater than file size`` says
    nothing of which file)."""
    try:
        yield
    except (ValueError, EOFError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        if str(path) in text:
            if isinstance(err, ValueError) and "\n" not in str(err):
                raise
            raise ValueError(text) from None
        raise ValueError(f"{path}: {text}") from None
