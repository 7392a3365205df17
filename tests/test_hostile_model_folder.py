"""A model folder is checked before it is parsed: links that leave it are refused, every recorded SHA-256 is
checked before any part is read, and what a parser says about a damaged file comes back as one line naming it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from geoswc.geolocator import Geolocator

SECRET = "root:x:0:0:TOP SECRET LINE\n  - second: [secret, line\n"


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    """A private copy of the tiny model folder, free to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _meta(folder):
    return json.loads((folder / "geolocator.json").read_text())


def _write_meta(folder, meta):
    (folder / "geolocator.json").write_text(json.dumps(meta, indent=2) + "\n")


def _record_again(folder, rel):
    """What an attacker who rewrites the checksums does: record the file's new SHA-256."""
    import hashlib

    meta = _meta(folder)
    meta["sha256"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    _write_meta(folder, meta)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_a_config_linked_to_a_file_outside_the_folder_is_refused_unread(folder, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text(SECRET)
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to(secret)
    with pytest.raises(ValueError) as err:
        Geolocator.from_pretrained(folder, device="cpu")
    text = _one_line(err)
    assert str(folder / "config.yaml") in text and "leads out of the model folder" in text
    assert "SECRET" not in text and str(secret) not in text


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_a_link_inside_the_folder_that_stays_inside_loads(folder):
    (folder / "spare.yaml").write_bytes((folder / "config.yaml").read_bytes())
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to("spare.yaml")
    assert Geolocator.from_pretrained(folder, device="cpu").head_names == ["ce", "hc", "mvmf"]


def test_checksums_are_verified_before_the_config_is_parsed(folder):
    (folder / "config.yaml").write_text('!!python/object/apply:os.system ["echo never-runs"]\n')
    with pytest.raises(ValueError) as err:
        Geolocator.from_pretrained(folder, device="cpu")
    text = _one_line(err)
    assert str(folder / "config.yaml") in text and "SHA-256" in text


def test_a_python_tag_in_a_config_whose_checksum_was_rewritten_is_one_line(folder):
    (folder / "config.yaml").write_text('swc: !!python/object/apply:os.system ["echo never-runs"]\n')
    _record_again(folder, "config.yaml")
    with pytest.raises(ValueError) as err:
        Geolocator.from_pretrained(folder, device="cpu")
    text = _one_line(err)
    assert text.startswith(f"{folder / 'config.yaml'}: not a plain YAML configuration")
    assert "python/object/apply" in text


@pytest.mark.parametrize("keep", [0.5, 0.0])  # half: numpy says "mmap length is greater than file size"
def test_a_truncated_index_array_in_a_folder_without_checksums_is_one_line_naming_it(folder, keep):
    path = folder / "index" / "embeddings.npy"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    meta = _meta(folder)
    meta.pop("sha256")
    _write_meta(folder, meta)
    with pytest.raises(ValueError) as err:
        Geolocator.from_pretrained(folder, device="cpu")
    text = _one_line(err)
    assert str(folder / "index") in text, text
